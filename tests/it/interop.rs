//! Interop with the real npm `seaport@2.0.9`: Node clients against our hub, our
//! client and CLI against a Node hub, and a Node hub peered with ours. These tests
//! fail (never skip) when Node is missing.

use crate::harness::{HubProc, Proc, node, node_event, node_hub, seaport, show, wait_until};
use seaport::client::{Client, Event};
use serde_json::{Value, json};
use std::time::Duration;

/// Parses a JSON line printed by one of the Node scripts.
fn json_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line from node {line:?}: {e}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_node_client_registers_nested_metadata_on_our_hub() {
    let hub = HubProc::start(&[]);
    let reg = node(
        "client.js",
        &[
            "register",
            &hub.addr(),
            "web@1.2.3",
            r#"{"deep":{"list":[1,{"x":"y"}]},"port":4567}"#,
        ],
    );
    let record = node_event(&reg, "registered")["record"].clone();
    assert_eq!(
        record["host"], "127.0.0.1",
        "our helo carries a plain IPv4 address"
    );
    assert_eq!(record["port"], 4567, "a fixed port is kept");
    let shown = show(&hub.addr());
    assert_eq!(shown.as_array().map(Vec::len), Some(1));
    assert_eq!(shown[0], record, "the record round-trips untouched");
    assert_eq!(shown[0]["deep"], json!({"list":[1,{"x":"y"}]}));
    assert_eq!(shown[0]["role"], "web");
    assert_eq!(shown[0]["version"], "1.2.3");
}

#[test]
fn a_node_get_waits_then_answers_with_our_record() {
    let hub = HubProc::start(&[]);
    let get = node("client.js", &["get", &hub.addr(), "web@1.2.x"]);
    node_event(&get, "waiting");
    let rt = runtime();
    let ours = rt.block_on(async {
        let client = Client::connect([hub.addr()]).expect("client");
        let wrong = client
            .register("web@1.3.0", json!({}))
            .await
            .expect("register");
        let right = client
            .register("web@1.2.7", json!({"by":"rust"}))
            .await
            .expect("register");
        (client, wrong, right)
    });
    let found = node_event(&get, "found");
    let records = found["records"].as_array().cloned().unwrap_or_default();
    assert_eq!(records.len(), 1, "only 1.2.7 satisfies 1.2.x: {found}");
    assert_eq!(records[0]["id"], ours.2.id());
    assert_eq!(records[0]["by"], "rust");
    assert_eq!(records[0]["host"], "127.0.0.1");
}

#[test]
fn node_queries_our_hub_by_version_range() {
    let hub = HubProc::start(&[]);
    let rt = runtime();
    let _client = rt.block_on(async {
        let client = Client::connect([hub.addr()]).expect("client");
        for v in ["0.9.0", "1.0.0", "1.4.2", "2.0.0"] {
            client
                .register(&format!("api@{v}"), json!({}))
                .await
                .expect("register");
        }
        client
    });
    let query = node("client.js", &["query", &hub.addr(), "api@1.x"]);
    let answer = node_event(&query, "query");
    let mut versions: Vec<String> = answer["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["version"].as_str().map(String::from))
        .collect();
    versions.sort();
    assert_eq!(versions, ["1.0.0", "1.4.2"]);
}

#[test]
fn a_killed_node_client_is_freed_on_our_hub() {
    let hub = HubProc::start(&[]);
    let rt = runtime();
    let (watcher, mut events) = rt
        .block_on(async { Client::connect_with_events([hub.addr()], Default::default()) })
        .expect("client");
    let mut reg = node(
        "client.js",
        &["register", &hub.addr(), "worker@0.1.0", "{}"],
    );
    let id = node_event(&reg, "registered")["record"]["id"].clone();
    reg.kill();
    let freed = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Ok(Event::Free(r)) = events.recv().await {
                    return r;
                }
            }
        })
        .await
        .expect("a free event")
    });
    assert_eq!(json!(freed.id()), id);
    assert!(watcher.query("worker").expect("q").is_empty());
}

#[test]
fn a_node_client_reconnects_and_reregisters_after_our_hub_restarts() {
    let port = crate::harness::free_port().to_string();
    let start = || {
        let proc = Proc::spawn(
            "seaport listen",
            seaport(&["listen", &port, "--host", "127.0.0.1"]),
        );
        assert_eq!(proc.line(), format!("seaport listening on :{port}"));
        proc
    };
    let addr = format!("127.0.0.1:{port}");
    let mut hub = start();
    let reg = node(
        "client.js",
        &["register", &addr, "web@1.0.0", r#"{"port":4100}"#],
    );
    let record = node_event(&reg, "registered")["record"].clone();
    hub.kill();
    node_event(&reg, "disconnect");
    let _hub = start();
    node_event(&reg, "connect");
    wait_until("the Node client's record is back", || {
        show(&addr) == json!([record.clone()])
    });
}

#[test]
fn our_client_and_cli_work_against_a_node_hub() {
    let (_hub, port) = node_hub();
    let addr = format!("127.0.0.1:{port}");
    let watch = Proc::spawn("seaport watch", seaport(&["watch", &addr]));
    let rt = runtime();
    let client = rt
        .block_on(async { Client::connect([addr.clone()]) })
        .expect("client");
    let rec = rt
        .block_on(client.register("web@1.2.3", json!({"zone":"eu"})))
        .expect("register on a Node hub");
    assert_eq!(
        rec.host(),
        Some("127.0.0.1"),
        "::ffff: is stripped from the Node hub's helo"
    );
    let line = watch.line();
    assert_eq!(
        line,
        format!(
            "REGISTER web@1.2.3 127.0.0.1:{} [{}]",
            rec.port().unwrap_or(0),
            rec.id()
        )
    );
    let shown = show(&addr);
    assert_eq!(shown, json!([serde_json::to_value(&rec).expect("json")]));
    let out = seaport(&["query", &addr, "web@^1.0.0", "zone"])
        .output()
        .expect("query");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[\n  \"eu\"\n]\n");
    // A Node client on the Node hub sees our record.
    let query = node("client.js", &["query", &addr, "web"]);
    assert_eq!(node_event(&query, "query")["records"][0]["id"], rec.id());
    client.close();
    let line = watch.line();
    assert!(line.starts_with("FREE web@1.2.3 127.0.0.1:"), "{line}");
}

#[test]
fn a_node_hub_peered_with_ours_exchanges_records_both_ways() {
    let ours = HubProc::start(&[]);
    let node_hub = node("hub.js", &[&ours.addr()]);
    let node_port = node_event(&node_hub, "listening")["port"]
        .as_u64()
        .expect("port");
    let node_addr = format!("127.0.0.1:{node_port}");
    // The Node hub announces itself on ours as seaport@2.0.9.
    wait_until("the Node hub's seaport record reaches our hub", || {
        show(&ours.addr())
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["role"] == "seaport"))
    });
    let announced = show(&ours.addr());
    assert_eq!(announced[0]["version"], "2.0.9");
    assert_eq!(announced[0]["port"], node_port);

    // Node side to ours.
    let reg = node(
        "client.js",
        &["register", &node_addr, "from-node@1.0.0", r#"{"x":1}"#],
    );
    let from_node = node_event(&reg, "registered")["record"].clone();
    wait_until("the Node-side record reaches our hub", || {
        show(&ours.addr())
            .as_array()
            .is_some_and(|a| a.contains(&from_node))
    });

    // Our side to Node.
    let rt = runtime();
    let client = rt
        .block_on(async { Client::connect([ours.addr()]) })
        .expect("client");
    let rec = rt
        .block_on(client.register("from-rust@1.0.0", json!({"y":2})))
        .expect("register");
    let record = json_line(&node_hub.line_where("registering from-rust", |l| {
        l.contains("\"register\"") && l.contains("from-rust")
    }));
    assert_eq!(record["record"]["id"], rec.id());
    assert_eq!(record["record"]["y"], 2);

    // Frees cross too, and nothing is duplicated.
    client.close();
    node_hub.line_where("free of from-rust", |l| {
        l.contains("\"free\"") && l.contains("from-rust")
    });
    let roles: Vec<Value> = show(&ours.addr())
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["role"].clone())
        .collect();
    assert_eq!(roles.iter().filter(|r| *r == "from-node").count(), 1);
    assert_eq!(roles.iter().filter(|r| *r == "seaport").count(), 1);
}
