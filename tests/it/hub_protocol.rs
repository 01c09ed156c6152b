//! The hub speaks the seaport 2.x rows exactly: helo, dump, synced, forwarding,
//! loop prevention, and freeing on close and on missed heartbeats.

use crate::harness::{DEADLINE, HubProc, Raw};
use serde_json::json;
use std::time::Duration;

#[test]
fn greets_with_helo_then_dump_then_synced() {
    let hub = HubProc::start(&[]);
    let (_raw, host, dump) = Raw::connect_synced(&hub.addr());
    assert_eq!(host, "127.0.0.1");
    assert!(dump.is_empty());
}

#[test]
fn reports_ipv4_peers_without_the_mapped_prefix_on_a_dual_stack_listener() {
    // No --host: the hub binds [::] (dual stack) where IPv6 exists.
    let proc =
        crate::harness::Proc::spawn("seaport listen", crate::harness::seaport(&["listen", "0"]));
    let line = proc.line();
    let port = line.trim_start_matches("seaport listening on :");
    let (_raw, host, _) = Raw::connect_synced(&format!("127.0.0.1:{port}"));
    assert_eq!(host, "127.0.0.1");
}

#[test]
fn forwards_registers_to_others_and_dumps_them_to_newcomers() {
    let hub = HubProc::start(&[]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    let meta = json!({"role":"web","version":"1.2.3","port":4000,"host":"10.1.1.1","nested":{"a":[1,{"b":null}]}});
    a.send(&json!(["register", "ID1", meta]).to_string());
    let row = b.row();
    assert_eq!(row[0], "register");
    assert_eq!(row[1], "ID1");
    assert_eq!(row[2]["nested"], json!({"a":[1,{"b":null}]}));
    assert_eq!(row[2]["id"], "ID1", "the hub sets meta.id to the row id");
    assert_eq!(row[2]["host"], "10.1.1.1", "an explicit host is kept");

    let (_c, _, dump) = Raw::connect_synced(&hub.addr());
    assert_eq!(dump.len(), 1);
    assert_eq!(dump[0][2]["nested"], json!({"a":[1,{"b":null}]}));

    // The sender does not get its own row back: the next thing it sees is B's row.
    b.send(r#"["register","ID2",{"role":"db","port":5000}]"#);
    let row = a.row();
    assert_eq!(row[1], "ID2");
    assert_eq!(
        row[2]["host"], "127.0.0.1",
        "a record without host gets the peer's address"
    );
}

#[test]
fn a_row_the_hub_adds_nothing_to_is_forwarded_as_it_arrived() {
    let hub = HubProc::start(&[]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    let plain = r#"[ "register", "R1", {"port": 5000, "role": "web", "version": "1.0.0", "host": "10.0.0.1", "id": "R1"} ]"#;
    a.send(plain);
    // As it arrived, with the hub's one element added: who owns the record.
    let body = plain.strip_suffix(']').expect("a row");
    assert_eq!(
        b.text_line(),
        format!("{body},{{\"owner\":\"connection\"}}]\n")
    );
    // Without a host, the hub fills it in: the row is the hub's own.
    a.send(r#"[ "register", "R2", {"role": "web", "port": 5001} ]"#);
    let line = b.text_line();
    let row: serde_json::Value = serde_json::from_str(&line).expect("a JSON row");
    assert_eq!((&row[1], row[2]["host"].is_string()), (&json!("R2"), true));
    assert!(line.starts_with(r#"["register","R2",{"#), "{line}");
    // An extension element a client wrote never travels on: the hub reads
    // it (here a claim, the client's secret) and puts its own in its place.
    a.send(
        r#"[ "register", "R3", {"role": "web", "port": 5002, "host": "h", "id": "R3"}, {"claim": "secret"} ]"#,
    );
    let line = b.text_line();
    assert!(
        line.starts_with(
            r#"[ "register", "R3", {"role": "web", "port": 5002, "host": "h", "id": "R3"},{"owner":"claim:"#
        ),
        "{line}"
    );
    assert!(
        line.ends_with("\"}]\n") && !line.contains("secret"),
        "{line}"
    );
    // Newcomers get the first row as it arrived too.
    let (_, _, dump) = Raw::connect_synced(&hub.addr());
    assert!(
        dump.iter()
            .any(|row| row[1] == "R1" && row[2]["port"] == 5000)
    );
}

#[test]
fn an_equal_register_is_not_forwarded_again() {
    let hub = HubProc::start(&[]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    let reg = r#"["register","X",{"role":"web","port":4000,"host":"h","id":"X"}]"#;
    a.send(reg);
    assert_eq!(b.row()[1], "X");
    a.send(reg); // equal: dropped
    a.send(r#"["register","Y",{"role":"web","port":4001,"host":"h"}]"#);
    assert_eq!(b.row()[1], "Y", "the repeated X must not be forwarded");
    // A changed record is forwarded as an update.
    a.send(r#"["register","X",{"role":"web","port":4002,"host":"h"}]"#);
    let row = b.row();
    assert_eq!(
        (row[1].clone(), row[2]["port"].clone()),
        (json!("X"), json!(4002))
    );
}

#[test]
fn forwards_frees_and_ignores_unknown_ids() {
    let hub = HubProc::start(&[]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    a.send(r#"["register","X",{"role":"web","port":4000}]"#);
    assert_eq!(b.row()[1], "X");
    a.send(r#"["free","NOPE"]"#);
    a.send(r#"["free","X"]"#);
    assert_eq!(b.row(), json!(["free", "X"]));
    let (_c, _, dump) = Raw::connect_synced(&hub.addr());
    assert!(dump.is_empty());
}

#[test]
fn frees_every_record_of_a_closed_connection() {
    let hub = HubProc::start(&[]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    a.send(r#"["register","X",{"role":"web","port":4000}]"#);
    a.send(r#"["register","Y",{"role":"web","port":4001}]"#);
    assert_eq!(b.row()[1], "X");
    assert_eq!(b.row()[1], "Y");
    drop(a);
    let mut freed = vec![b.row(), b.row()];
    freed.sort_by_key(|r| r[1].to_string());
    assert_eq!(freed, vec![json!(["free", "X"]), json!(["free", "Y"])]);
}

#[test]
fn frees_the_records_of_a_connection_that_misses_its_heartbeats() {
    let hub = HubProc::start(&["--heartbeat", "100", "--timeout", "400"]);
    let (mut silent, _, _) = Raw::connect_synced(&hub.addr());
    let (mut watcher, _, _) = Raw::connect_synced(&hub.addr());
    // The watcher keeps talking; the other says it beats every 100 ms, then
    // falls silent.
    watcher.keep_alive(Duration::from_millis(100), Duration::from_secs(5));
    silent.send(r#"["heartbeat",100]"#);
    silent.send(r#"["register","X",{"role":"web","port":4000}]"#);
    assert_eq!(watcher.row()[1], "X");
    assert_eq!(watcher.row(), json!(["free", "X"]));
    assert!(
        silent.closed_within(DEADLINE),
        "the silent connection must be closed"
    );
}

#[test]
fn a_client_on_long_heartbeats_is_not_dropped_by_a_hub_with_short_ones() {
    // A Node client on its defaults beats every 15 s and says nothing about
    // it; a hub beating every 50 ms must still give it three of those.
    let hub = HubProc::start(&["--heartbeat", "50", "--timeout", "60"]);
    let (mut quiet, _, _) = Raw::connect_synced(&hub.addr());
    quiet.send(r#"["register","Q",{"role":"web","port":4000}]"#);
    let (mut slow, _, _) = Raw::connect_synced(&hub.addr());
    slow.send(r#"["heartbeat",2000]"#);
    slow.send(r#"["register","S",{"role":"web","port":4001}]"#);
    // Well past the hub's own timeout, both are still there.
    let (watcher, _, _) = Raw::connect_synced(&hub.addr());
    watcher.keep_alive(Duration::from_millis(20), Duration::from_secs(5));
    assert!(
        !quiet.closed_within(Duration::from_millis(500)),
        "a client that never said its heartbeat was dropped"
    );
    assert!(
        !slow.closed_within(Duration::from_millis(100)),
        "a client that beats every 2 s was dropped"
    );
    let (_, _, dump) = Raw::connect_synced(&hub.addr());
    // Two connections' registers: their order is the hub's to pick.
    let mut ids: Vec<&str> = dump.iter().filter_map(|r| r[1].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["Q", "S"]);
}

#[test]
fn sends_heartbeats() {
    let hub = HubProc::start(&["--heartbeat", "50"]);
    let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
    assert_eq!(raw.next_any_row(), json!(["heartbeat"]));
}
