//! The etcd test support (`tests/support/etcd.rs`) against real etcd: a
//! single member keeps its data across a kill and a stop, a three-member
//! cluster goes on writing with one member down and takes it back, and
//! dropping an `Etcd` leaves neither a process nor a directory behind.

use crate::etcd::Etcd;
use std::net::TcpStream;
use std::time::Instant;

/// The value of `key`, read through etcdctl.
fn value(etcd: &Etcd, key: &str) -> Result<String, String> {
    etcd.etcdctl(&["get", key, "--print-value-only"])
        .map(|out| out.trim_end().to_string())
}

/// After the drop: nothing listens on the members' ports and the directory
/// is gone.
fn gone(endpoints: &[String], dir: &std::path::Path) {
    for endpoint in endpoints {
        assert!(
            TcpStream::connect(endpoint.as_str()).is_err(),
            "something still listens on {endpoint}"
        );
    }
    assert!(!dir.exists(), "{} is still there", dir.display());
}

#[test]
fn a_single_member_keeps_its_data_across_kill_and_stop() {
    let started = Instant::now();
    let mut etcd = Etcd::single().unwrap_or_else(|e| panic!("{e}"));
    eprintln!("single member healthy in {:?}", started.elapsed());
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(etcd.url(), format!("etcd://{}", endpoints[0]));
    assert_eq!(etcd.pids().len(), 1);

    etcd.etcdctl(&["put", "/seaport/a", "one"])
        .unwrap_or_else(|e| panic!("{e}"));
    etcd.etcdctl(&["put", "/seaport/b", "two"])
        .unwrap_or_else(|e| panic!("{e}"));
    etcd.etcdctl(&["put", "/other", "three"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&etcd, "/seaport/a").as_deref(), Ok("one"));
    assert_eq!(etcd.count_keys("/seaport/"), Ok(2));
    assert_eq!(etcd.count_keys("/nothing/"), Ok(0));
    assert_eq!(etcd.count_keys(""), Ok(3));

    etcd.kill(0).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        TcpStream::connect(endpoints[0].as_str()).is_err(),
        "a killed member still listens"
    );
    assert!(etcd.pids().is_empty(), "a killed member has a pid");
    assert!(etcd.etcdctl(&["get", "/seaport/a"]).is_err());
    let restarted = Instant::now();
    etcd.restart(0).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("single member healthy again in {:?}", restarted.elapsed());
    assert_eq!(value(&etcd, "/seaport/a").as_deref(), Ok("one"));
    assert_eq!(etcd.count_keys("/seaport/"), Ok(2));
    assert!(etcd.restart(0).is_err(), "restarted a running member");

    etcd.stop(0).unwrap_or_else(|e| panic!("{e}"));
    etcd.restart(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&etcd, "/seaport/b").as_deref(), Ok("two"));

    let dir = etcd.dir().to_path_buf();
    drop(etcd);
    gone(&endpoints, &dir);
}

#[test]
fn a_three_member_cluster_writes_with_one_member_down() {
    let started = Instant::now();
    let mut etcd = Etcd::cluster(3).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("three members healthy in {:?}", started.elapsed());
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(etcd.url(), format!("etcd://{}", endpoints.join(",")));
    let list = etcd
        .etcdctl(&["member", "list"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(list.lines().count(), 3, "{list}");

    etcd.etcdctl(&["put", "/seaport/a", "one"])
        .unwrap_or_else(|e| panic!("{e}"));
    etcd.kill(1).unwrap_or_else(|e| panic!("{e}"));
    // Member 1 may have been the leader: wait for a new one, or a write may
    // hang until etcd's request timeout (5 s).
    let killed = Instant::now();
    etcd.wait_healthy().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "members 0 and 2 healthy {:?} after the kill",
        killed.elapsed()
    );
    etcd.etcdctl(&["put", "/seaport/b", "two"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(etcd.count_keys("/seaport/"), Ok(2));

    let restarted = Instant::now();
    etcd.restart(1).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("member 1 healthy again in {:?}", restarted.elapsed());
    // With member 0 down, a write needs member 1 back in the quorum, and a
    // read of member 1 or 2 the data member 1 missed.
    etcd.stop(0).unwrap_or_else(|e| panic!("{e}"));
    etcd.wait_healthy().unwrap_or_else(|e| panic!("{e}"));
    etcd.etcdctl(&["put", "/seaport/c", "three"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&etcd, "/seaport/b").as_deref(), Ok("two"));
    assert_eq!(etcd.count_keys("/seaport/"), Ok(3));
    etcd.restart(0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value(&etcd, "/seaport/c").as_deref(), Ok("three"));

    let dir = etcd.dir().to_path_buf();
    drop(etcd);
    gone(&endpoints, &dir);
}
