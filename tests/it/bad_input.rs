//! A hub faces the network: every kind of bad input is refused, and the hub goes on
//! serving everyone else.

use crate::harness::{DEADLINE, HubProc, Raw, wait_until};
use serde_json::json;
use std::time::Duration;

/// Sends `bad` on one connection, then proves that this connection still works and
/// that the hub still serves others.
fn refused_but_connection_survives(hub: &HubProc, bad: &[u8], case: usize) {
    let (mut sender, _, _) = Raw::connect_synced(&hub.addr());
    let (mut other, _, _) = Raw::connect_synced(&hub.addr());
    let after = format!("AFTER{case}");
    sender.send_bytes(bad).expect("send bad line");
    sender.send(&format!(
        r#"["register","{after}",{{"role":"ok","port":4000}}]"#
    ));
    // The frees of earlier cases' connections may still be on their way.
    let mut row = other.row();
    while row[0] == "free" && row[1].as_str().is_some_and(|id| id.starts_with("AFTER")) {
        row = other.row();
    }
    assert_eq!(
        row[1],
        after,
        "after {:?} the next good row must still be forwarded, got {row}",
        String::from_utf8_lossy(bad)
    );
    // The dropped row left nothing behind.
    let (_c, _, dump) = Raw::connect_synced(&hub.addr());
    let ids: Vec<_> = dump.iter().filter_map(|r| r[1].as_str()).collect();
    assert!(
        ids.iter().all(|id| id.starts_with("AFTER")),
        "a refused row was stored: {ids:?}"
    );
    assert!(ids.contains(&after.as_str()));
}

#[test]
fn malformed_rows_are_dropped_and_the_connection_goes_on() {
    let hub = HubProc::start(&[]);
    let deep = format!(
        "[\"register\",\"D\",{}{}]\n",
        "{\"a\":".repeat(100),
        "1".to_string() + &"}".repeat(100)
    );
    let cases: Vec<Vec<u8>> = vec![
        b"this is not json\n".to_vec(),
        b"{\"an\":\"object\"}\n".to_vec(),
        b"[]\n".to_vec(),
        b"[42]\n".to_vec(),
        b"[\"register\",\"NOMETA\"]\n".to_vec(),
        b"[\"register\",7,{\"role\":\"x\"}]\n".to_vec(),
        b"[\"register\",\"S\",\"meta as a string\"]\n".to_vec(),
        b"[\"register\",\"P\",{\"role\":\"x\",\"port\":70000}]\n".to_vec(),
        b"[\"register\",\"Q\",{\"role\":\"x\",\"port\":-5}]\n".to_vec(),
        b"[\"free\",{\"id\":1}]\n".to_vec(),
        b"[\"register\",\"U\",{\"role\":\"\xff\xfe\"}]\n".to_vec(),
        deep.into_bytes(),
        b"[\"register\",\"T\",{\"role\":\"x\"\n".to_vec(),
    ];
    for (case, bad) in cases.iter().enumerate() {
        refused_but_connection_survives(&hub, bad, case);
    }
}

#[test]
fn a_register_without_meta_does_not_kill_the_hub() {
    // The Node hub dies on this row; ours drops it.
    let hub = HubProc::start(&[]);
    let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
    raw.send(r#"["register","x"]"#);
    let (_again, host, _) = Raw::connect_synced(&hub.addr());
    assert_eq!(host, "127.0.0.1");
}

#[test]
fn an_oversized_line_closes_only_that_connection_before_it_ends() {
    let hub = HubProc::start(&["--max-line", "1000"]);
    let (mut big, _, _) = Raw::connect_synced(&hub.addr());
    let (mut other, _, _) = Raw::connect_synced(&hub.addr());
    big.send(r#"["register","MINE",{"role":"web","port":4000}]"#);
    assert_eq!(other.row()[1], "MINE");
    // 2000 bytes and no newline: the hub must not wait for the end of the line.
    big.send_bytes(&[b'x'; 2000]).expect("send");
    assert!(
        big.closed_within(DEADLINE),
        "the oversized connection stays open"
    );
    assert_eq!(
        other.row(),
        json!(["free", "MINE"]),
        "its records are freed"
    );
    other.send(r#"["register","OTHER",{"role":"web","port":4001}]"#);
    wait_until("the hub stores the next record", || {
        let (_c, _, dump) = Raw::connect_synced(&hub.addr());
        dump.len() == 1 && dump[0][1] == "OTHER"
    });
}

#[test]
fn a_client_that_stops_reading_is_cut_off_not_buffered() {
    let hub = HubProc::start(&["--max-queue", "16"]);
    let (mut stalled, _, _) = Raw::connect_synced(&hub.addr());
    let (mut writer, _, _) = Raw::connect_synced(&hub.addr());
    let (mut reader, _, _) = Raw::connect_synced(&hub.addr());
    // Enough forwarded bytes to fill the stalled client's socket buffers and then
    // its 16-row queue. The reading client takes each row before the next is sent,
    // so only the stalled one can fall behind.
    let pad = "p".repeat(64 * 1024);
    for i in 0..400 {
        writer.send(&format!(
            r#"["register","R{i}",{{"role":"bulk","port":4000,"pad":"{pad}"}}]"#
        ));
        assert_eq!(reader.row()[1], format!("R{i}"));
    }
    assert!(
        stalled.closed_within(Duration::from_secs(30)),
        "a client that never reads must be disconnected"
    );
    // And the hub still serves.
    let (_c, _, dump) = Raw::connect_synced(&hub.addr());
    assert_eq!(dump.len(), 400);
}

#[test]
fn thousands_of_idle_connections_are_fine() {
    raise_fd_limit(8192);
    let hub = HubProc::start(&[]);
    let mut idle: Vec<Raw> = (0..2000).map(|_| Raw::connect(&hub.addr())).collect();
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    a.send(r#"["register","LIVE",{"role":"web","port":4000}]"#);
    assert_eq!(b.row()[1], "LIVE");
    // Every idle connection was greeted and got the record: in its dump if the
    // hub had not served it yet when LIVE arrived, forwarded after it otherwise.
    for raw in idle.iter_mut().step_by(999) {
        assert_eq!(raw.row()[0], "helo");
        assert_eq!(raw.row()[0], "challenge");
        let (mut synced, mut live) = (false, false);
        while !(synced && live) {
            let row = raw.row();
            synced |= row == json!(["synced"]);
            live |= row[0] == "register" && row[1] == "LIVE";
        }
    }
    drop(idle);
    drop(a);
    assert_eq!(b.row(), json!(["free", "LIVE"]));
}

fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    let target = want.min(hard);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).expect("setrlimit");
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        soft >= 2100,
        "this test needs 2100 open files, the hard limit allows {soft}"
    );
}
