//! Records that cannot lie: owners, what others may do to a record, launchers
//! that put their records back, admin keys, and clients that trust only real
//! hubs. Real hubs, launchers and Node 2.0.9 clients throughout.

use crate::auth::{LoggedHub, Signer, authorized_file, key, next_reject, pair};
use crate::cluster::{Mode, Proxy};
use crate::harness::{HubProc, Proc, Raw, Rows, node, node_event, seaport, show, wait_until};
use seaport::{Client, ClientConfig};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// `seaport register HUB web@1.0.0 --ready none ARGS -- sleep 600`.
fn launcher(hub: &str, args: &[&str]) -> Proc {
    let mut argv = vec!["register", hub, "web@1.0.0", "--ready", "none"];
    argv.extend_from_slice(args);
    argv.extend(["--", "sleep", "600"]);
    Proc::spawn("seaport register web", seaport(&argv))
}

/// The hub's record of role `web`, once there is one.
fn web_record(hub: &str) -> Value {
    let mut found = Value::Null;
    wait_until("a web record is on the hub", || {
        found = show(hub)
            .as_array()
            .and_then(|records| records.iter().find(|r| r["role"] == "web").cloned())
            .unwrap_or(Value::Null);
        !found.is_null()
    });
    found
}

/// The record `id` on the hub, or null.
fn record(hub: &str, id: &str) -> Value {
    show(hub)
        .as_array()
        .and_then(|records| records.iter().find(|r| r["id"] == id).cloned())
        .unwrap_or(Value::Null)
}

fn web_row(id: &str, host: &str, port: u16, extra: Value) -> String {
    let mut meta = json!({"role": "web", "version": "1.0.0", "host": host, "port": port});
    if let (Some(meta), Value::Object(extra)) = (meta.as_object_mut(), extra) {
        meta.extend(extra);
    }
    json!(["register", id, meta]).to_string()
}

#[test]
fn another_key_can_neither_change_nor_free_a_keyed_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json", "bob.json"]);
    let hub = LoggedHub::start(&["--authorized", list.to_str().expect("utf8")]);
    let alice = key("alice.json");
    let _web = launcher(&hub.addr(), &["--key", alice.to_str().expect("utf8")]);
    let true_record = web_record(&hub.addr());
    let id = true_record["id"].as_str().expect("id").to_string();
    let alice_key = pair("alice.json").fingerprint().to_string();
    let bob = pair("bob.json");
    let mut signer = Signer::connect(&hub.addr(), &bob);
    let attempts = [
        ("register", web_row(&id, "127.6.6.6", 6666, json!({}))),
        (
            "register",
            web_row(
                &id,
                true_record["host"].as_str().expect("host"),
                u16::try_from(true_record["port"].as_u64().expect("port")).expect("port"),
                json!({"weight": 1}),
            ),
        ),
        ("free", json!(["free", id]).to_string()),
    ];
    for (what, row) in attempts {
        signer.write(&row);
        let reject = next_reject(&mut signer.raw);
        assert_eq!(reject[1], what, "{reject}");
        assert_eq!(reject[2], id.as_str(), "{reject}");
        assert_eq!(reject[3], format!("owned by key {alice_key}"), "{reject}");
        assert_eq!(reject[4], bob.fingerprint().to_string(), "{reject}");
        hub.logged(&[
            &format!("refused {what} {id}: owned by key {alice_key}"),
            &format!("key={}", bob.fingerprint()),
        ]);
    }
    assert_eq!(
        record(&hub.addr(), &id),
        true_record,
        "the record is as alice wrote it"
    );
}

#[test]
fn on_an_open_hub_a_launcher_puts_back_what_others_change_or_free() {
    let hub = HubProc::start(&[]);
    let web = launcher(&hub.addr(), &[]);
    let true_record = web_record(&hub.addr());
    let id = true_record["id"].as_str().expect("id").to_string();
    let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
    // Anyone may write on an open hub, as in the Node package.
    raw.send(&web_row(&id, "127.6.6.6", 6666, json!({"weight": 3})));
    let put_back = Instant::now();
    wait_until("the launcher puts its host and port back", || {
        let now = record(&hub.addr(), &id);
        now["host"] == true_record["host"] && now["port"] == true_record["port"]
    });
    eprintln!("put back after {:?}", put_back.elapsed());
    // Others' metadata stays as they set it.
    assert_eq!(record(&hub.addr(), &id)["weight"], 3);
    raw.send(&json!(["free", id]).to_string());
    wait_until("a free is undone", || {
        let now = record(&hub.addr(), &id);
        !now.is_null() && now["port"] == true_record["port"]
    });
    wait_until("the launcher says what it did", || {
        let log = web.stderr();
        log.contains("port, host changed by someone else; putting it back")
            || log.contains("host, port changed by someone else; putting it back")
    });
    wait_until("the launcher says it undid a free", || {
        web.stderr()
            .contains("freed by someone else; putting it back")
    });
}

#[test]
fn an_owned_hub_refuses_others_and_keeps_node_clients_working() {
    let hub = HubProc::start(&["--owned"]);
    // Logged on stderr, apart from the listening line on stdout.
    wait_until("the hub says owners are enforced", || {
        hub.proc.stderr().contains(
            "no authorized keys: every connection may write, and only a record's owner may \
             change or free it (--owned)",
        )
    });
    let _web = launcher(&hub.addr(), &[]);
    let true_record = web_record(&hub.addr());
    let id = true_record["id"].as_str().expect("id").to_string();
    let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
    raw.send(&web_row(&id, "127.6.6.6", 6666, json!({})));
    let reject = next_reject(&mut raw);
    assert_eq!(reject[3], "owned by another client", "{reject}");
    raw.send(&json!(["free", id]).to_string());
    let reject = next_reject(&mut raw);
    assert_eq!(reject[1], "free", "{reject}");
    assert_eq!(record(&hub.addr(), &id), true_record);

    // A Node 2.0.9 client registers, updates and frees its own record.
    let (rows, _) = Rows::connect(&hub.addr());
    let node_client = node("client.js", &["lifecycle", &hub.addr(), "lc@1.0.0"]);
    node_client.line_where("freed", |l| l.contains("\"freed\""));
    let mut seen = Vec::new();
    while let Some(row) = rows.next_within(Duration::from_secs(2)) {
        let done = row[0] == "free";
        seen.push(row);
        if done {
            break;
        }
    }
    let kinds: Vec<(String, Value)> = seen
        .iter()
        .filter(|r| r[1] != id.as_str())
        .map(|r| (r[0].as_str().unwrap_or("?").to_string(), r[2]["x"].clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("register".to_string(), json!(1)),
            ("register".to_string(), json!(2)),
            ("free".to_string(), Value::Null)
        ],
        "{seen:#?}"
    );
}

#[test]
fn a_node_client_registers_again_after_a_reconnect_on_an_owned_hub() {
    let hub = HubProc::start(&["--owned"]);
    let proxy = Proxy::start(&hub.addr());
    let node_client = node(
        "client.js",
        &["register", &proxy.addr(), "again@1.0.0", "{}"],
    );
    let id = node_event(&node_client, "registered")["record"]["id"]
        .as_str()
        .expect("id")
        .to_string();
    wait_until("its record is on the hub", || {
        !record(&hub.addr(), &id).is_null()
    });
    proxy.set(Mode::Refuse);
    wait_until("the cut freed it", || record(&hub.addr(), &id).is_null());
    proxy.set(Mode::Pass);
    wait_until("the Node client registered it again", || {
        !record(&hub.addr(), &id).is_null()
    });
}

fn fast() -> ClientConfig {
    ClientConfig {
        heartbeat: Duration::from_millis(200),
        timeout: Duration::from_millis(600),
        reconnect_delay: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

#[test]
fn a_client_takes_its_records_back_after_a_reconnect_and_after_failover_and_nobody_else_may() {
    // Hub a beats every 200 ms, so its clients notice a silence soon, but
    // keeps a silent connection 30 s, so when the client's connection through
    // the proxy is blackholed, a still holds the record under it when the
    // client comes back another way.
    let b = HubProc::start(&["--owned", "--heartbeat", "200"]);
    let a = HubProc::start(&[
        "--owned",
        "--heartbeat",
        "200",
        "--timeout",
        "30000",
        "--peer",
        &b.addr(),
    ]);
    let proxy = Proxy::start(&a.addr());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (client, id) = rt.block_on(async {
        let client = Client::connect_with([proxy.addr(), a.addr()], fast()).expect("client");
        let rec = tokio::time::timeout(
            Duration::from_secs(10),
            client.register("svc@1.0.0", json!({})),
        )
        .await
        .expect("registered in time")
        .expect("registered");
        (client, rec.id().to_string())
    });
    wait_until("b learns the record", || !record(&b.addr(), &id).is_null());
    // Another client may not take it, on either hub.
    for hub in [&a, &b] {
        let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
        raw.send(
            &json!(["register", id, {"role": "svc", "version": "1.0.0", "port": 1}]).to_string(),
        );
        let reject = next_reject(&mut raw);
        assert_eq!(reject[3], "owned by another client", "{reject}");
    }
    // The client's connection goes silent; it comes back to a directly, and
    // its claim takes the record from the connection a still thinks alive.
    proxy.set(Mode::Blackhole);
    std::thread::sleep(Duration::from_millis(700));
    wait_until("the client is back on hub a", || {
        rt.block_on(client.confirm(Duration::from_millis(300)))
    });
    assert_eq!(client.rejection(&id), None, "the hub refused the claim");
    // When the old connection does end, the record is not freed with it.
    proxy.set(Mode::Refuse);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !record(&a.addr(), &id).is_null(),
        "the record went with the old connection"
    );

    // Failing over to b: the claim takes the record over there too, so it
    // outlives a's beats (600 ms on b) while its client lives.
    let failover = {
        let _runtime = rt.enter();
        Client::connect_with([a.addr(), b.addr()], fast()).expect("client")
    };
    let moved = rt.block_on(async {
        failover
            .register_with(seaport::Registration::new("moving@1.0.0").port(4242))
            .await
            .expect("registered")
            .id()
            .to_string()
    });
    wait_until("b learns the moving record", || {
        !record(&b.addr(), &moved).is_null()
    });
    drop(a);
    wait_until("the moving client is on b", || {
        rt.block_on(failover.confirm(Duration::from_millis(300)))
    });
    assert_eq!(failover.rejection(&moved), None);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !record(&b.addr(), &moved).is_null(),
        "b dropped the record with a's beats: its client's claim did not take it over"
    );
    failover.close();
    wait_until("b frees it when its client goes", || {
        record(&b.addr(), &moved).is_null()
    });
    client.close();
}

#[test]
fn a_refused_free_is_reported_on_a_hub_of_many_records() {
    // More records than a client's event channel holds: the dump must not
    // crowd the hub's refusal out.
    let hub = HubProc::start(&["--owned"]);
    let (mut owner, _, _) = Raw::connect_synced(&hub.addr());
    let rows: String = (0..5000)
        .map(|i| {
            format!(
                "[\"register\",\"MANY{i}\",{{\"role\":\"many\",\"host\":\"10.0.0.1\",\"port\":{},\"id\":\"MANY{i}\"}}]\n",
                10_000 + i
            )
        })
        .collect();
    owner.send_bytes(rows.as_bytes()).expect("send");
    wait_until("the hub holds every record", || {
        !record(&hub.addr(), "MANY4999").is_null()
    });
    let refused = seaport(&["free", &hub.addr(), "MANY7"])
        .output()
        .expect("free");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("the hub refused to free MANY7"), "{stderr}");
    assert!(!record(&hub.addr(), "MANY7").is_null());
}

#[test]
fn an_admin_key_frees_any_record_and_its_owner_puts_it_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = dir.path().join("admin.json");
    let out = seaport(&["keygen"]).output().expect("keygen");
    std::fs::write(&admin, &out.stdout).expect("write");
    let admin = admin.to_str().expect("utf8");
    let hub = HubProc::start(&["--owned", "--admin-key", admin]);
    let web = launcher(&hub.addr(), &[]);
    let id = web_record(&hub.addr())["id"]
        .as_str()
        .expect("id")
        .to_string();
    let refused = seaport(&["free", &hub.addr(), &id]).output().expect("free");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&format!(
            "the hub refused to free {id}: owned by another client"
        )),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let freed = seaport(&["free", &hub.addr(), &id, "--key", admin])
        .output()
        .expect("free");
    assert!(
        freed.status.success(),
        "{}",
        String::from_utf8_lossy(&freed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&freed.stdout).trim(),
        format!("freed {id}")
    );
    wait_until("the launcher puts it back", || {
        web.stderr()
            .contains("freed by someone else; putting it back")
            && !record(&hub.addr(), &id).is_null()
    });
}

#[test]
fn a_free_with_a_key_that_may_not_is_reported_as_refused() {
    // The free waits for the key's session; the confirmation must not pass it.
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json", "bob.json"]);
    let hub = LoggedHub::start(&["--authorized", list.to_str().expect("utf8")]);
    let alice = key("alice.json");
    let _web = launcher(&hub.addr(), &["--key", alice.to_str().expect("utf8")]);
    let id = web_record(&hub.addr())["id"]
        .as_str()
        .expect("id")
        .to_string();
    let bob = key("bob.json");
    let out = seaport(&[
        "free",
        &hub.addr(),
        &id,
        "--key",
        bob.to_str().expect("utf8"),
    ])
    .output()
    .expect("free");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "stdout {:?}, stderr {stderr:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("the hub refused to free {id}: owned by key")),
        "{stderr}"
    );
    assert!(!record(&hub.addr(), &id).is_null(), "the record went");
}

#[test]
fn a_seaport_record_needs_a_hub_key_on_a_secured_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json"]);
    let hubs = key("bob.json");
    let hub = LoggedHub::start(&[
        "--authorized",
        list.to_str().expect("utf8"),
        "--hub-key",
        hubs.to_str().expect("utf8"),
    ]);
    let mut alice = Signer::connect(&hub.addr(), &pair("alice.json"));
    alice.write(
        &json!(["register", "FAKE", {"role": "seaport", "version": "2.1.0", "port": 1}])
            .to_string(),
    );
    let reject = next_reject(&mut alice.raw);
    assert_eq!(reject[3], "a seaport record must be written with a hub key");
    // A hub key may.
    let mut bob = Signer::connect(&hub.addr(), &pair("bob.json"));
    bob.write(
        &json!(["register", "REAL", {"role": "seaport", "version": "2.1.0", "port": 1}])
            .to_string(),
    );
    wait_until("the hub's record is taken", || {
        !record(&hub.addr(), "REAL").is_null()
    });
    let owners = seaport(&["show", &hub.addr(), "--owners"])
        .output()
        .expect("show");
    let owners: Value = serde_json::from_slice(&owners.stdout).expect("JSON");
    assert_eq!(
        owners[0]["owner"],
        format!("key {}", pair("bob.json").fingerprint())
    );
}

#[test]
fn a_client_given_hub_keys_never_uses_an_impostor_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The real hub has its own key; the impostor has none.
    let real = HubProc::start(&[key("bob.json").to_str().expect("utf8")]);
    let impostor = HubProc::start(&[]);
    let trusted = authorized_file(dir.path(), &["bob.json"]);
    let trusted = trusted.to_str().expect("utf8");
    // A fake seaport record on the real (open) hub, pointing at the impostor.
    let (mut attacker, _, _) = Raw::connect_synced(&real.addr());
    attacker.send(&json!(["register", "FAKEHUB", {"role": "seaport", "version": "2.1.0", "host": "127.0.0.1", "port": impostor.port}]).to_string());
    wait_until("the fake record is on the hub", || {
        !record(&real.addr(), "FAKEHUB").is_null()
    });
    // Given the impostor first, the launcher skips it: it proves no hub key.
    let hubs = format!("{},{}", impostor.addr(), real.addr());
    let web = launcher(&hubs, &["--hub-key", trusted]);
    let id = web_record(&real.addr())["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(record(&impostor.addr(), &id).is_null());
    // Given only the real hub, it does not fail over to the fake record.
    let only_real = launcher(&real.addr(), &["--hub-key", trusted]);
    wait_until("both launchers are on the real hub", || {
        show(&real.addr())
            .as_array()
            .is_some_and(|r| r.iter().filter(|r| r["role"] == "web").count() == 2)
    });
    drop(real);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        show(&impostor.addr()),
        json!([]),
        "a launcher went to the impostor"
    );
    assert!(
        web.stderr().contains("did not prove it holds a hub key")
            || web.stderr().contains("proves no key"),
        "{}",
        web.stderr()
    );
    drop(only_real);
}

#[test]
fn a_hub_proves_its_key_ahead_of_a_large_dump() {
    let hub = HubProc::start(&[key("bob.json").to_str().expect("utf8")]);
    // About 24 MiB of records: more than the sockets hold.
    let (mut writer, _, _) = Raw::connect_synced(&hub.addr());
    let pad = "x".repeat(1000);
    let mut rows = String::new();
    for n in 0..24_000 {
        rows.push_str(
            &json!(["register", format!("R{n}"), {"role": "web", "port": 1000 + n % 50_000, "pad": pad}])
                .to_string(),
        );
        rows.push('\n');
    }
    writer.send_bytes(rows.as_bytes()).expect("send");
    wait_until("the hub holds the records", || {
        let (_c, _, dump) = Raw::connect_synced(&hub.addr());
        dump.len() >= 24_000
    });
    // A client that asks for the proof at once gets it before the records end.
    let mut client = Raw::connect(&hub.addr());
    client.send(r#"["prove","bm9uY2Utbm9uY2Utbm9uY2Utbm9uY2Utbm9uY2U="]"#);
    let mut records = 0;
    loop {
        let row = client.row();
        match row[0].as_str() {
            Some("proof") => break,
            Some("register") => records += 1,
            Some("synced") => panic!("the whole dump ({records} records) came before the proof"),
            _ => {}
        }
    }
    assert!(records < 24_000, "{records}");
}

#[test]
fn a_client_given_hub_keys_does_not_hold_what_an_unproved_hub_streams() {
    // A "hub" that greets and then streams rows, and never proves a key.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = conn.write_all(b"[\"helo\",\"127.0.0.1\"]\n");
                let row = format!(
                    "{}\n",
                    json!(["register", "X", {"role": "web", "port": 1, "pad": "y".repeat(4000)}])
                );
                for _ in 0..20_000 {
                    if conn.write_all(row.as_bytes()).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_secs(60));
            });
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let trusted = authorized_file(dir.path(), &["bob.json"]);
    let web = launcher(
        &format!("127.0.0.1:{port}"),
        &["--hub-key", trusted.to_str().expect("utf8")],
    );
    wait_until("the launcher gives up on the hub", || {
        web.stderr()
            .contains("bytes before proving it holds a hub key")
    });
}
