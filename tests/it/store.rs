//! Hubs over a real etcd (`--store`): any hub serves one registry, whatever
//! hub each client, Node's included, connects to; records live on leases of
//! their connections; two hubs never hold one port; and faults: a hub
//! SIGKILLed (its clients, ours and Node's, fail over; its dead clients'
//! records expire), etcd restarted, a member of a 3-member cluster killed,
//! leases and records lost behind the hubs' backs. etcd is Debian's
//! `etcd-server`, started on loopback ports with a temporary data directory
//! (see `tests/support/etcd.rs`).
//!
//! The hubs beat every 200 ms, so their timeout, and the TTL of their leases
//! (etcd's floor, 2 s), come within seconds.

use crate::etcd::Etcd;
use crate::harness::{HubProc, Raw, node, node_event, refused, wait_until};
use crate::launcher::Launcher;
use crate::supervisor::{Root, Sup};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Heartbeat of the hubs and clients here, in milliseconds.
pub(crate) const HEARTBEAT_MS: &str = "200";

/// How long a dead client's or hub's records may outlive it: the hub's
/// timeout (600 ms), rounded up to etcd's floor for a lease's TTL (2 s),
/// plus a second for etcd's expiry sweep and the hubs' watches.
const EXPIRY_BOUND: Duration = Duration::from_secs(3);

/// The prefix the hubs of these tests use.
pub(crate) const PREFIX: &str = "/seaport/";

/// The longest any wait here may take.
const LIMIT: Duration = Duration::from_secs(20);

pub(crate) fn etcd_single() -> Etcd {
    Etcd::single().unwrap_or_else(|e| panic!("cannot start etcd: {e}"))
}

/// `seaport listen 0 --store URL` with 200 ms heartbeats.
pub(crate) fn hub_over(etcd: &Etcd) -> HubProc {
    HubProc::start(&["--heartbeat", HEARTBEAT_MS, "--store", &etcd.url()])
}

/// Record ids a hub holds, by its dump to a fresh connection, with their
/// rows.
pub(crate) fn held(hub: &str) -> Vec<Value> {
    let (_raw, _, dump) = Raw::connect_synced(hub);
    dump.into_iter().map(|row| row[2].clone()).collect()
}

/// Ids of the records of `role` a hub holds.
pub(crate) fn ids_of(hub: &str, role: &str) -> BTreeSet<String> {
    held(hub)
        .iter()
        .filter(|meta| meta["role"] == role)
        .filter_map(|meta| meta["id"].as_str().map(String::from))
        .collect()
}

/// Waits until every hub holds exactly the records `want` of `role`.
fn wait_all_hold(hubs: &[&str], role: &str, want: &BTreeSet<String>) {
    let end = Instant::now() + LIMIT;
    loop {
        let seen: Vec<BTreeSet<String>> = hubs.iter().map(|hub| ids_of(hub, role)).collect();
        if seen.iter().all(|ids| ids == want) {
            return;
        }
        assert!(
            Instant::now() < end,
            "hubs {hubs:?} hold {seen:?} of role {role}, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The record ids under the prefix in etcd.
pub(crate) fn ids_in_etcd(etcd: &Etcd) -> BTreeSet<String> {
    let keys = etcd
        .etcdctl(&[
            "get",
            &format!("{PREFIX}records/"),
            "--prefix",
            "--keys-only",
        ])
        .unwrap_or_else(|e| panic!("etcdctl get: {e}"));
    keys.lines()
        .filter_map(|key| key.strip_prefix(&format!("{PREFIX}records/")))
        .map(String::from)
        .collect()
}

/// A raw client of a hub, which closes its connection when dropped.
pub(crate) struct Client(pub(crate) Raw);

impl Drop for Client {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// A register row of `id` as `role` on `127.0.0.1:PORT`.
pub(crate) fn register_row(id: &str, role: &str, port: u16) -> String {
    format!(
        r#"["register","{id}",{{"role":"{role}","version":"1.0.0","host":"127.0.0.1","port":{port},"id":"{id}"}}]"#
    )
}

/// A connection of `hub` that says it beats every 200 ms, sends `rows`, and
/// keeps beating for two minutes (or until dropped).
pub(crate) fn connection(hub: &str, rows: &[String]) -> Client {
    let (mut raw, _, _) = Raw::connect_synced(hub);
    raw.send(&format!(r#"["heartbeat",{HEARTBEAT_MS}]"#));
    for row in rows {
        raw.send(row);
    }
    raw.keep_alive(Duration::from_millis(150), Duration::from_secs(120));
    Client(raw)
}

/// A raw client of `hub` that registers `id` as `role` on `port`.
pub(crate) fn raw_client(hub: &str, role: &str, id: &str, port: u16) -> Client {
    connection(hub, &[register_row(id, role, port)])
}

/// The claim on `127.0.0.1:PORT` in etcd: the id of the record that holds
/// it, or empty.
pub(crate) fn claim(etcd: &Etcd, port: u16) -> String {
    value_in_etcd(etcd, &format!("{PREFIX}ports/127.0.0.1:{port}"))
}

/// The value of `key` in etcd, or empty.
pub(crate) fn value_in_etcd(etcd: &Etcd, key: &str) -> String {
    etcd.etcdctl(&["get", key, "--print-value-only"])
        .expect("etcdctl get")
        .trim()
        .to_string()
}

/// Leases in etcd (`etcdctl lease list`: `found N leases`, then an id per
/// line).
pub(crate) fn lease_count(etcd: &Etcd) -> usize {
    let out = etcd.etcdctl(&["lease", "list"]).expect("lease list");
    out.lines().skip(1).filter(|l| !l.trim().is_empty()).count()
}

/// A hub over `etcd` with 200 ms beats and the admin endpoint, and the
/// endpoint's address.
pub(crate) fn hub_with_admin(etcd: &Etcd) -> (HubProc, std::net::SocketAddr) {
    let hub = HubProc::start(&[
        "--heartbeat",
        HEARTBEAT_MS,
        "--store",
        &etcd.url(),
        "--admin",
        "0",
    ]);
    let admin = crate::admin::admin_addr(&hub.proc);
    (hub, admin)
}

pub(crate) fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|id| id.to_string()).collect()
}

#[test]
fn hubs_over_one_etcd_serve_one_registry_to_node_and_our_clients() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let hubs = [a.addr(), b.addr()];
    let hubs: Vec<&str> = hubs.iter().map(String::as_str).collect();

    // A Node 2.0.9 client on A, our launcher on B.
    let mut node_client = node(
        "client.js",
        &["register", &a.addr(), "web@1.2.3", r#"{"port":23456}"#],
    );
    let registered: Value =
        serde_json::from_str(&node_client.line()).expect("the Node client prints JSON");
    let registered = if registered["event"] == "connect" {
        serde_json::from_str(&node_client.line()).expect("the Node client prints JSON")
    } else {
        registered
    };
    assert_eq!(registered["event"], "registered", "{registered}");
    let node_id = registered["record"]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    let launcher = Launcher::start(&b.addr(), "api@2.0.0", &[], &[]);
    let api = {
        let mut ids = BTreeSet::new();
        wait_until("the launcher's record is on B", || {
            ids = ids_of(&b.addr(), "api");
            ids.len() == 1
        });
        ids
    };
    wait_all_hold(&hubs, "web", &set(&[&node_id]));
    wait_all_hold(&hubs, "api", &api);

    // Both hubs' own records, so that clients can fail over between them.
    for hub in &hubs {
        let seaports = held(hub)
            .iter()
            .filter(|meta| meta["role"] == "seaport")
            .count();
        assert_eq!(seaports, 2, "{hub} does not know both hubs");
    }
    // etcd holds them all, and the claims of their ports.
    let in_etcd = ids_in_etcd(&etcd);
    assert!(in_etcd.contains(&node_id), "{in_etcd:?}");
    assert!(api.iter().all(|id| in_etcd.contains(id)), "{in_etcd:?}");
    assert_eq!(
        claim(&etcd, 23456),
        node_id,
        "the port's claim names the record"
    );

    // A Node client's query on B sees what our launcher and the Node client
    // registered on A and B.
    let mut query = node("client.js", &["query", &b.addr(), "web@1.x"]);
    let answer: Value = loop {
        let line: Value = serde_json::from_str(&query.line()).expect("JSON");
        if line["event"] == "query" {
            break line;
        }
    };
    assert_eq!(answer["records"][0]["id"], node_id.as_str(), "{answer}");
    query.wait();

    // A client that goes: its record goes from every hub, and from etcd, at
    // once (its connection's lease is revoked), not after a timeout.
    let gone_at = Instant::now();
    node_client.kill();
    wait_all_hold(&hubs, "web", &BTreeSet::new());
    assert!(
        gone_at.elapsed() < Duration::from_millis(1500),
        "the record went after {:?}, as by expiry, not at once",
        gone_at.elapsed()
    );
    wait_until("etcd no longer has the Node client's record", || {
        !ids_in_etcd(&etcd).contains(&node_id)
    });
    assert_eq!(claim(&etcd, 23456), "", "the claim outlived its record");
    drop(launcher);
}

#[test]
fn a_killed_hubs_clients_fail_over_and_its_dead_clients_records_expire() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    // Our launcher starts on A; it learns B from B's `seaport` record.
    let launcher = Launcher::start(&a.addr(), "api@2.0.0", &[], &[]);
    let mut api = BTreeSet::new();
    wait_until("the launcher's record is on both hubs", || {
        api = ids_of(&a.addr(), "api");
        api.len() == 1 && ids_of(&b.addr(), "api") == api
    });
    wait_until("A knows B", || {
        held(&a.addr())
            .iter()
            .any(|meta| meta["role"] == "seaport" && meta["port"] == b.port)
    });
    // A raw client on A that will not come back: its record must go.
    let ghost = raw_client(&a.addr(), "ghost", "GHOST", 40001);
    wait_all_hold(&[&b.addr()], "ghost", &set(&["GHOST"]));

    a.proc.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    drop(ghost);
    // The launcher's record stays (it moves to B), the ghost's goes within
    // the bound.
    wait_until("the ghost's record expired", || {
        ids_of(&b.addr(), "ghost").is_empty()
    });
    assert!(
        killed_at.elapsed() <= EXPIRY_BOUND,
        "a dead client's record outlived its hub by {:?}",
        killed_at.elapsed()
    );
    wait_all_hold(&[&b.addr()], "api", &api);
    // Long after A's leases expired, the live client's record is still there,
    // in etcd too: it is on B's lease now.
    std::thread::sleep(EXPIRY_BOUND);
    assert_eq!(
        ids_of(&b.addr(), "api"),
        api,
        "a live client's record was lost"
    );
    let in_etcd = ids_in_etcd(&etcd);
    assert!(api.iter().all(|id| in_etcd.contains(id)), "{in_etcd:?}");
    assert!(!in_etcd.contains("GHOST"), "{in_etcd:?}");
    // A's own record is gone from B.
    assert!(
        !held(&b.addr())
            .iter()
            .any(|meta| meta["role"] == "seaport" && meta["port"] == a.port),
        "the dead hub's record survived"
    );
    drop(launcher);
}

#[test]
fn a_node_client_of_a_killed_hub_fails_over_and_its_record_comes_back() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    // The Node client connects once A knows B, so that B's `seaport` record
    // is in what A sends it first: that is where a 2.0.9 client looks for
    // another hub.
    wait_until("A knows B", || {
        held(&a.addr())
            .iter()
            .any(|meta| meta["role"] == "seaport" && meta["port"] == b.port)
    });
    let node_client = node(
        "client.js",
        &["register", &a.addr(), "web@1.2.3", r#"{"port":23457}"#],
    );
    let id = node_event(&node_client, "registered")["record"]["id"]
        .as_str()
        .expect("an id")
        .to_string();
    wait_all_hold(&[&a.addr(), &b.addr()], "web", &set(&[&id]));

    a.proc.signal(Signal::SIGKILL);
    let killed_at = Instant::now();
    node_event(&node_client, "disconnect");
    // 2.0.9 tries the hub it was given first, a second after each failure,
    // then the next `seaport` record it knew.
    node_event(&node_client, "connect");
    // It registered again on B, which moved the record to B's lease: it
    // outlives A's leases, in etcd too, with its port's claim.
    std::thread::sleep(EXPIRY_BOUND.saturating_sub(killed_at.elapsed()));
    wait_all_hold(&[&b.addr()], "web", &set(&[&id]));
    assert!(ids_in_etcd(&etcd).contains(&id), "the record left etcd");
    assert_eq!(claim(&etcd, 23457), id, "the port's claim names the record");
}

#[test]
fn writes_wait_while_etcd_is_down_and_every_live_record_is_there_after() {
    let mut etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let _one = raw_client(&a.addr(), "svc", "ONE", 40011);
    let two = raw_client(&b.addr(), "svc", "TWO", 40012);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));

    etcd.kill(0).expect("kill etcd");
    // Reads go on from what each hub holds, and each hub's own clients'
    // writes show there; the other hub learns of them once etcd is back.
    let _three = raw_client(&a.addr(), "svc", "THREE", 40013);
    drop(two);
    wait_all_hold(&[&a.addr()], "svc", &set(&["ONE", "TWO", "THREE"]));
    wait_all_hold(&[&b.addr()], "svc", &set(&["ONE"]));
    // Down for longer than the leases' TTL.
    std::thread::sleep(EXPIRY_BOUND);
    assert_eq!(ids_of(&a.addr(), "svc"), set(&["ONE", "TWO", "THREE"]));

    etcd.restart(0).expect("restart etcd");
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "THREE"]));
    wait_until("etcd holds exactly the live records", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("ONE") && ids.contains("THREE") && !ids.contains("TWO")
    });
    // And they stay: the leases they are on live.
    std::thread::sleep(EXPIRY_BOUND);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "THREE"]));
    let stderr = a.proc.stderr();
    assert!(
        stderr.contains("writes wait"),
        "the hub did not say its writes wait: {stderr}"
    );
}

#[test]
fn records_and_leases_lost_behind_the_hubs_backs_come_back() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let _one = raw_client(&a.addr(), "svc", "ONE", 40021);
    let _two = raw_client(&b.addr(), "svc", "TWO", 40022);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));
    wait_until("etcd holds both", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("ONE") && ids.contains("TWO")
    });

    // An operator deletes every record: the hubs write their own again.
    etcd.etcdctl(&["del", &format!("{PREFIX}records/"), "--prefix"])
        .expect("etcdctl del");
    wait_until("etcd holds both again", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("ONE") && ids.contains("TWO")
    });
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));

    // Every lease revoked: the hubs find out and write everything again,
    // on new leases.
    // `found N leases`, then one hex id per line.
    let leases = etcd.etcdctl(&["lease", "list"]).expect("lease list");
    let ids: Vec<&str> = leases
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .collect();
    assert!(!ids.is_empty(), "no leases listed: {leases}");
    for id in &ids {
        etcd.etcdctl(&["lease", "revoke", id])
            .unwrap_or_else(|e| panic!("revoke {id}: {e}"));
    }
    wait_until("etcd holds both on new leases", || {
        let ids = ids_in_etcd(&etcd);
        ids.contains("ONE") && ids.contains("TWO")
    });
    std::thread::sleep(EXPIRY_BOUND);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));
    let now = ids_in_etcd(&etcd);
    assert!(now.contains("ONE") && now.contains("TWO"), "{now:?}");
}

#[test]
fn one_member_of_three_killed_loses_nothing() {
    let mut etcd = Etcd::cluster(3).unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    let _one = raw_client(&a.addr(), "svc", "ONE", 40031);
    let _two = raw_client(&b.addr(), "svc", "TWO", 40032);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));

    for member in 0..3 {
        etcd.kill(member).expect("kill a member");
        let three = format!("THREE{member}");
        let late = raw_client(&a.addr(), "late", &three, 40040 + member as u16);
        wait_all_hold(&[&a.addr(), &b.addr()], "late", &set(&[&three]));
        wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));
        etcd.restart(member).expect("restart the member");
        drop(late);
        wait_all_hold(&[&a.addr(), &b.addr()], "late", &BTreeSet::new());
    }
    std::thread::sleep(EXPIRY_BOUND);
    wait_all_hold(&[&a.addr(), &b.addr()], "svc", &set(&["ONE", "TWO"]));
}

#[test]
fn two_hubs_never_hold_one_port() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    // Two clients on two hubs take 127.0.0.1:40050 at once.
    let mut first = raw_client(&a.addr(), "svc", "FIRST", 40050);
    let mut second = raw_client(&b.addr(), "svc", "SECOND", 40050);
    let end = Instant::now() + LIMIT;
    let (mut winners, mut hubs_agree) = (BTreeSet::new(), false);
    while Instant::now() < end {
        let on_a = ids_of(&a.addr(), "svc");
        let on_b = ids_of(&b.addr(), "svc");
        hubs_agree = on_a == on_b && on_a.len() == 1;
        if hubs_agree {
            winners = on_a;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        hubs_agree,
        "the hubs never agreed on one holder of the port"
    );
    let loser = if winners.contains("FIRST") {
        &mut second.0
    } else {
        &mut first.0
    };
    // The loser is told, as a refused register.
    let reject = loop {
        let row = loser.row();
        if row[0] == "reject" {
            break row;
        }
    };
    assert_eq!(reject[1], "register", "{reject}");
    let reason = reject[3].as_str().unwrap_or_default();
    assert!(
        reason.contains("127.0.0.1:40050") && reason.contains("taken"),
        "{reject}"
    );
    let claim = claim(&etcd, 40050);
    assert!(
        winners.contains(&claim),
        "claim {claim:?}, holder {winners:?}"
    );
}

#[test]
fn a_supervisors_built_in_hub_keeps_its_services_in_the_store() {
    let etcd = etcd_single();
    let b = hub_over(&etcd);
    let root = Root::new();
    root.service("web", "web@1.0.0", &[], "");
    let url = etcd.url();
    let proc = Sup::spawn(
        &root,
        &[
            "--listen",
            "0",
            "--heartbeat",
            HEARTBEAT_MS,
            "--store",
            &url,
        ],
        &[],
    );
    let first = proc.line();
    assert!(first.starts_with("seaport listening on :"), "{first}");
    let mut web = BTreeSet::new();
    wait_until("the supervised service is on the other hub", || {
        web = ids_of(&b.addr(), "web");
        web.len() == 1
    });
    assert!(ids_in_etcd(&etcd).is_superset(&web));
    drop(proc);
}

#[test]
fn a_store_with_peers_or_a_bad_url_is_refused_with_the_reason() {
    let stderr = refused(&[
        "listen",
        "0",
        "--store",
        "etcd://127.0.0.1:2379",
        "--peer",
        "127.0.0.1:9090",
    ]);
    assert!(
        stderr.contains("--peer and --store cannot be used together"),
        "{stderr}"
    );
    let stderr = refused(&["listen", "0", "--store", "http://127.0.0.1:2379"]);
    assert!(stderr.contains("etcd://HOST:PORT"), "{stderr}");
    let stderr = refused(&[
        "supervise",
        "services.d",
        "--check",
        "--store-prefix",
        "/x/",
    ]);
    assert!(stderr.contains("--store"), "{stderr}");
}

/// A raw client of `hub` that registers `id` on `port` with a claim (the
/// proof, on an owned hub, that it is the record's owner).
fn claiming_client(hub: &str, id: &str, port: u16, secret: &str) -> Client {
    let (mut raw, _, _) = Raw::connect_synced(hub);
    raw.send(&format!(
        r#"["register","{id}",{{"role":"svc","host":"127.0.0.1","port":{port},"id":"{id}"}},{{"claim":"{secret}"}}]"#
    ));
    raw.keep_alive(Duration::from_millis(150), Duration::from_secs(60));
    Client(raw)
}

/// The next `reject` row a client gets.
pub(crate) fn next_reject(client: &mut Client) -> Value {
    loop {
        let row = client.0.row();
        if row[0] == "reject" {
            return row;
        }
    }
}

/// The port of record `id` on `hub`, if it holds it.
/// The port `hub` holds record `id` on, if it holds it.
pub(crate) fn port_of(hub: &str, id: &str) -> Option<u64> {
    held(hub)
        .into_iter()
        .find(|meta| meta["id"] == id)
        .and_then(|meta| meta["port"].as_u64())
}

#[test]
fn owners_travel_with_their_records_through_the_store() {
    let etcd = etcd_single();
    let a = HubProc::start(&[
        "--heartbeat",
        HEARTBEAT_MS,
        "--owned",
        "--store",
        &etcd.url(),
    ]);
    let b = HubProc::start(&[
        "--heartbeat",
        HEARTBEAT_MS,
        "--owned",
        "--store",
        &etcd.url(),
    ]);
    let _owner = claiming_client(&a.addr(), "MINE", 40061, "s3cret");
    wait_all_hold(&[&b.addr()], "svc", &set(&["MINE"]));
    // On the other hub, a client with another claim may neither change nor
    // free it ...
    let mut other = claiming_client(&b.addr(), "MINE", 40062, "wrong");
    assert_eq!(next_reject(&mut other)[1], "register");
    other.0.send(r#"["free","MINE",{"claim":"wrong"}]"#);
    assert_eq!(next_reject(&mut other)[1], "free");
    for hub in [a.addr(), b.addr()] {
        assert_eq!(port_of(&hub, "MINE"), Some(40061), "{hub}");
    }
    // ... and one with the owner's claim may: the claim's hash came with
    // the record.
    let _moved = claiming_client(&b.addr(), "MINE", 40063, "s3cret");
    for hub in [a.addr(), b.addr()] {
        wait_until("the owner's change is everywhere", || {
            port_of(&hub, "MINE") == Some(40063)
        });
    }
}

#[test]
fn the_admin_endpoint_shows_whether_the_store_takes_writes() {
    use crate::admin::{admin_addr, get, sample, wait_for_sample};
    let mut etcd = etcd_single();
    let (hub, admin) = hub_with_admin(&etcd);
    let _one = raw_client(&hub.addr(), "svc", "ONE", 40071);
    wait_for_sample(admin, "seaport_store_up", 1.0);
    let scrape = wait_for_sample(admin, "seaport_store_leases", 2.0);
    // The hub's own record and ONE, each with its port's claim.
    assert!(
        sample(&scrape, "seaport_store_writes_total").is_some_and(|n| n >= 2.0),
        "{scrape}"
    );
    assert_eq!(sample(&scrape, "seaport_store_writes_waiting"), Some(0.0));

    etcd.kill(0).expect("kill etcd");
    let _two = raw_client(&hub.addr(), "svc", "TWO", 40072);
    wait_for_sample(admin, "seaport_store_up", 0.0);
    // TWO's write failed, and waits again.
    wait_until("a failed write waits", || {
        let scrape = get(admin, "/metrics").body;
        sample(&scrape, "seaport_store_write_failures_total").is_some_and(|n| n >= 1.0)
            && sample(&scrape, "seaport_store_writes_waiting") == Some(1.0)
    });
    etcd.restart(0).expect("restart etcd");
    wait_for_sample(admin, "seaport_store_writes_waiting", 0.0);
    wait_for_sample(admin, "seaport_store_up", 1.0);
    // A hub without a store shows none of it.
    let plain = HubProc::start(&["--admin", "0"]);
    let scrape = get(admin_addr(&plain.proc), "/metrics").body;
    assert!(!scrape.contains("seaport_store_"), "{scrape}");
}

#[test]
fn one_connections_many_records_spread_over_leases_and_all_land() {
    let etcd = etcd_single();
    let a = hub_over(&etcd);
    let b = hub_over(&etcd);
    // 3,000 records with ports: 6,000 keys, more than a lease may carry.
    let (mut raw, _, _) = Raw::connect_synced(&a.addr());
    raw.keep_alive(Duration::from_millis(150), Duration::from_secs(60));
    let mut burst = String::new();
    for n in 0..3000 {
        burst.push_str(&format!(
            r#"["register","MANY{n}",{{"role":"many","host":"127.0.0.1","port":{},"id":"MANY{n}"}}]"#,
            20000 + n
        ));
        burst.push('\n');
    }
    raw.send_bytes(burst.as_bytes()).expect("send the burst");
    let client = Client(raw);
    wait_until("etcd holds every record", || {
        etcd.count_keys(&format!("{PREFIX}records/MANY"))
            .is_ok_and(|n| n == 3000)
    });
    assert_eq!(
        etcd.count_keys(&format!("{PREFIX}ports/"))
            .expect("count claims"),
        3000,
        "one claim per record (a hub's own record claims none)"
    );
    wait_until("the other hub holds every record", || {
        ids_of(&b.addr(), "many").len() == 3000
    });
    // Two hubs' own leases, and at least six for the connection.
    let count = lease_count(&etcd);
    assert!(count >= 8, "{count} leases");
    // Gone at once when it leaves: its leases are revoked.
    drop(client);
    wait_until("every record is gone from etcd", || {
        etcd.count_keys(&format!("{PREFIX}records/MANY"))
            .is_ok_and(|n| n == 0)
    });
    wait_until("the other hub holds none", || {
        ids_of(&b.addr(), "many").is_empty()
    });
    // Through the revocation of its leases: the hubs' own are all that is left.
    wait_until("the connection's leases are revoked", || {
        lease_count(&etcd) == 2
    });
}
