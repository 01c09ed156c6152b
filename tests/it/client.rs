//! The client library against a real hub started in-process.

use seaport::client::{Client, ClientConfig, ClientError, Event, Registration};
use seaport::hub::{Hub, HubConfig};
use seaport::registry::ports::{PortError, PortRange};
use serde_json::json;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(20);

async fn hub() -> Hub {
    Hub::bind("127.0.0.1:0", HubConfig::default())
        .await
        .expect("bind hub")
}

/// Default settings, but reconnecting after 100 ms, so failover tests are quick.
fn quick_reconnect() -> ClientConfig {
    ClientConfig {
        reconnect_delay: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

fn client(hub: &Hub) -> Client {
    Client::connect([hub.local_addr().to_string()]).expect("client")
}

/// Waits for the first event satisfying `pred`.
async fn event_where(
    events: &mut broadcast::Receiver<Event>,
    what: &str,
    pred: impl Fn(&Event) -> bool,
) -> Event {
    timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event within {WAIT:?}"))
}

#[tokio::test]
async fn register_returns_a_record_on_a_free_port_seen_by_others() {
    let hub = hub().await;
    let a = client(&hub);
    let b = client(&hub);
    let web = timeout(
        WAIT,
        a.register("web@1.2.3", json!({"zone":"eu","deep":{"x":[1]}})),
    )
    .await
    .expect("register in time")
    .expect("register");
    assert_eq!(web.role(), Some("web"));
    assert_eq!(web.version(), Some("1.2.3"));
    assert_eq!(web.host(), Some("127.0.0.1"));
    let port = web.port().expect("a port");
    assert!(port >= 10000, "port {port} outside the default range");
    assert!(
        std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
        "the chosen port must be bindable"
    );
    let seen = timeout(WAIT, b.get("web@1.2.x"))
        .await
        .expect("get in time")
        .expect("get");
    assert_eq!(seen, vec![web.clone()]);
    assert_eq!(seen[0].get("deep"), Some(&json!({"x":[1]})));
    assert_eq!(
        hub.query(&seaport::Pattern::parse("web").expect("pattern")),
        vec![web]
    );
}

#[tokio::test]
async fn explicit_ports_ids_and_hosts_are_kept() {
    let hub = hub().await;
    let a = client(&hub);
    let rec = timeout(
        WAIT,
        a.register_with(
            Registration::new("db")
                .port(5432)
                .id("DB1")
                .host("10.0.0.9"),
        ),
    )
    .await
    .expect("in time")
    .expect("register");
    assert_eq!(
        (rec.port(), rec.id(), rec.host()),
        (Some(5432), "DB1", Some("10.0.0.9"))
    );
    assert_eq!(rec.version(), None);
}

#[tokio::test]
async fn ports_taken_on_the_same_host_are_avoided_and_exhaustion_is_an_error() {
    let hub = hub().await;
    let a = client(&hub);
    let b = client(&hub);
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    let p = probe.local_addr().expect("addr").port();
    drop(probe);
    let range = PortRange::new(p, p).expect("range");
    let first = timeout(WAIT, a.register_with(Registration::new("one").range(range)))
        .await
        .expect("in time")
        .expect("the only port is free");
    assert_eq!(first.port(), Some(p));
    // B must see A's record before it can avoid its port.
    timeout(WAIT, b.get("one"))
        .await
        .expect("in time")
        .expect("get");
    let second = timeout(WAIT, b.register_with(Registration::new("two").range(range)))
        .await
        .expect("in time");
    match second {
        Err(ClientError::Port(PortError::Exhausted { range: r, host })) => {
            assert_eq!((r, host.as_str()), (range, "127.0.0.1"));
        }
        other => panic!("expected an exhausted range, got {other:?}"),
    }
}

#[tokio::test]
async fn a_port_in_use_on_this_machine_is_skipped() {
    let hub = hub().await;
    let busy = std::net::TcpListener::bind("0.0.0.0:0").expect("busy");
    let p = busy.local_addr().expect("addr").port();
    let a = Client::connect_with(
        [hub.local_addr().to_string()],
        ClientConfig {
            range: PortRange::new(p, p).expect("range"),
            ..ClientConfig::default()
        },
    )
    .expect("client");
    let err = timeout(WAIT, a.register("web", json!({})))
        .await
        .expect("in time");
    assert!(
        matches!(err, Err(ClientError::Port(PortError::Exhausted { .. }))),
        "{err:?}"
    );
}

#[tokio::test]
async fn get_waits_until_a_match_registers() {
    let hub = hub().await;
    let waiter = client(&hub);
    let pending = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.get("api@^2.0.0").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pending.is_finished(),
        "get must wait while nothing matches"
    );
    let a = client(&hub);
    timeout(WAIT, a.register("api@1.9.0", json!({})))
        .await
        .expect("in time")
        .expect("reg");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "1.9.0 does not satisfy ^2.0.0");
    let v2 = timeout(WAIT, a.register("api@2.1.0", json!({})))
        .await
        .expect("in time")
        .expect("reg");
    let found = timeout(WAIT, pending)
        .await
        .expect("get answered")
        .expect("join")
        .expect("get");
    assert_eq!(found, vec![v2]);
}

#[tokio::test]
async fn query_uses_npm_ranges() {
    let hub = hub().await;
    let a = client(&hub);
    for v in ["1.0.0", "1.2.3", "1.2.9", "2.0.0", "2.0.0-beta.1"] {
        timeout(WAIT, a.register(&format!("svc@{v}"), json!({})))
            .await
            .expect("in time")
            .expect("reg");
    }
    timeout(WAIT, a.register("svc", json!({})))
        .await
        .expect("in time")
        .expect("reg");
    let versions = |p: &str| -> Vec<String> {
        a.query(p)
            .expect("pattern")
            .iter()
            .map(|r| r.version().unwrap_or("none").to_string())
            .collect()
    };
    assert_eq!(versions("svc@1.2.x"), ["1.2.3", "1.2.9"]);
    assert_eq!(versions("svc@1.2.3"), ["1.2.3"]);
    assert_eq!(versions("svc@^1.0.0"), ["1.0.0", "1.2.3", "1.2.9"]);
    assert_eq!(versions("svc@>=1.2.0 <2.0.0"), ["1.2.3", "1.2.9"]);
    assert_eq!(versions("svc@1.0.0 || 2.0.0"), ["1.0.0", "2.0.0"]);
    assert_eq!(versions("svc@*"), ["1.0.0", "1.2.3", "1.2.9", "2.0.0"]);
    assert_eq!(versions("svc").len(), 6);
    assert!(matches!(
        a.query("svc@>=nope"),
        Err(ClientError::Pattern(_))
    ));
}

#[tokio::test]
async fn set_and_free_reach_other_clients_as_events() {
    let hub = hub().await;
    let a = client(&hub);
    let (b, mut events) =
        Client::connect_with_events([hub.local_addr().to_string()], ClientConfig::default())
            .expect("client");
    event_where(&mut events, "connect", |e| matches!(e, Event::Connect(_))).await;
    event_where(&mut events, "synced", |e| matches!(e, Event::Synced)).await;
    let rec = timeout(WAIT, a.register("web@1.0.0", json!({"weight": 1})))
        .await
        .expect("t")
        .expect("r");
    let Event::Register(seen) =
        event_where(&mut events, "register", |e| matches!(e, Event::Register(_))).await
    else {
        unreachable!()
    };
    assert_eq!(seen, rec);
    let updated = a
        .set(rec.id(), json!({"weight": 5, "extra": "yes"}))
        .expect("known id");
    assert_eq!(updated.get("weight"), Some(&json!(5)));
    assert_eq!(updated.port(), rec.port(), "set keeps the other keys");
    let Event::Register(seen) =
        event_where(&mut events, "update", |e| matches!(e, Event::Register(_))).await
    else {
        unreachable!()
    };
    assert_eq!(seen.get("extra"), Some(&json!("yes")));
    assert!(a.free(rec.id()).is_some());
    let Event::Free(gone) = event_where(&mut events, "free", |e| matches!(e, Event::Free(_))).await
    else {
        unreachable!()
    };
    assert_eq!(gone.id(), rec.id());
    assert!(b.query("web").expect("q").is_empty());
}

#[tokio::test]
async fn closing_a_client_frees_its_records_everywhere() {
    let hub = hub().await;
    let a = client(&hub);
    let (b, mut events) =
        Client::connect_with_events([hub.local_addr().to_string()], ClientConfig::default())
            .expect("client");
    let rec = timeout(WAIT, a.register("web", json!({})))
        .await
        .expect("t")
        .expect("r");
    timeout(WAIT, b.get("web")).await.expect("t").expect("g");
    a.close();
    let Event::Free(gone) = event_where(&mut events, "free", |e| matches!(e, Event::Free(_))).await
    else {
        unreachable!()
    };
    assert_eq!(gone.id(), rec.id());
}

#[tokio::test]
async fn reconnects_and_resends_its_records_after_the_hub_restarts() {
    let first = hub().await;
    let addr = first.local_addr();
    let config = quick_reconnect();
    let (a, mut events) = Client::connect_with_events([addr.to_string()], config).expect("client");
    let rec = timeout(WAIT, a.register("web@1.0.0", json!({"k":"v"})))
        .await
        .expect("t")
        .expect("r");
    first.shutdown().await;
    event_where(&mut events, "disconnect", |e| {
        matches!(e, Event::Disconnect(_))
    })
    .await;
    let second = Hub::bind(addr, HubConfig::default())
        .await
        .expect("rebind same port");
    event_where(&mut events, "reconnect", |e| matches!(e, Event::Connect(_))).await;
    let watcher = client(&second);
    let again = timeout(WAIT, watcher.get("web"))
        .await
        .expect("t")
        .expect("g");
    assert_eq!(
        again,
        vec![rec],
        "same id, port and metadata after reconnect"
    );
}

#[tokio::test]
async fn fails_over_to_the_next_hub_round_robin() {
    let one = hub().await;
    let two = hub().await;
    let config = quick_reconnect();
    let (a, mut events) = Client::connect_with_events(
        [one.local_addr().to_string(), two.local_addr().to_string()],
        config,
    )
    .expect("client");
    let rec = timeout(WAIT, a.register("web", json!({})))
        .await
        .expect("t")
        .expect("r");
    timeout(WAIT, async {
        while one.query(&seaport::Pattern::all()).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the first hub holds the record");
    one.shutdown().await;
    event_where(&mut events, "disconnect", |e| {
        matches!(e, Event::Disconnect(_))
    })
    .await;
    let watcher = client(&two);
    let moved = timeout(WAIT, watcher.get("web"))
        .await
        .expect("t")
        .expect("g");
    assert_eq!(moved, vec![rec]);
}

#[tokio::test]
async fn learned_records_are_confirmed_or_dropped_after_a_reconnect() {
    let first = hub().await;
    let addr = first.local_addr();
    let config = quick_reconnect();
    let other = client(&first);
    timeout(WAIT, other.register("gone", json!({})))
        .await
        .expect("t")
        .expect("r");
    let (a, mut events) = Client::connect_with_events([addr.to_string()], config).expect("client");
    timeout(WAIT, a.get("gone")).await.expect("t").expect("g");
    first.shutdown().await;
    drop(other);
    event_where(&mut events, "disconnect", |e| {
        matches!(e, Event::Disconnect(_))
    })
    .await;
    assert_eq!(
        a.query("gone").expect("q").len(),
        1,
        "kept while reconnecting"
    );
    let _second = Hub::bind(addr, HubConfig::default()).await.expect("rebind");
    let Event::Free(gone) = event_where(&mut events, "free", |e| matches!(e, Event::Free(_))).await
    else {
        unreachable!()
    };
    assert_eq!(gone.role(), Some("gone"));
    assert!(
        a.query("gone").expect("q").is_empty(),
        "dropped: the new hub does not know it"
    );
}

#[tokio::test]
async fn fails_over_to_a_hub_learned_from_a_seaport_record() {
    let one = hub().await;
    let two = hub().await;
    // Hub two announces itself on hub one, as a peering hub does.
    let announcer = client(&one);
    timeout(
        WAIT,
        announcer.register_with(
            Registration::new("seaport@2.1.0")
                .port(two.local_addr().port())
                .host("127.0.0.1"),
        ),
    )
    .await
    .expect("in time")
    .expect("announce");
    let config = quick_reconnect();
    let (a, mut events) =
        Client::connect_with_events([one.local_addr().to_string()], config).expect("client");
    timeout(WAIT, a.get("seaport"))
        .await
        .expect("t")
        .expect("learned hub two");
    let rec = timeout(WAIT, a.register("web", json!({})))
        .await
        .expect("t")
        .expect("r");
    one.shutdown().await;
    event_where(&mut events, "disconnect", |e| {
        matches!(e, Event::Disconnect(_))
    })
    .await;
    let watcher = client(&two);
    let moved = timeout(WAIT, watcher.get("web"))
        .await
        .expect("t")
        .expect("g");
    assert_eq!(
        moved,
        vec![rec],
        "the client moved to the hub it learned about"
    );
}

#[tokio::test]
async fn a_hub_that_closes_every_connection_at_once_is_retried_after_a_delay() {
    // Accepts and closes at once, as a proxy with nothing behind it does.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    let config = ClientConfig {
        reconnect_delay: Duration::from_millis(200),
        ..ClientConfig::default()
    };
    let client = Client::connect_with([addr.to_string()], config).expect("client");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while accepted.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client never connected twice"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let began = accepted.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tries = accepted.load(std::sync::atomic::Ordering::SeqCst) - began;
    client.close();
    // One try per 200 ms: five in a second, not thousands.
    assert!(tries <= 8, "{tries} connections in a second");
}

#[tokio::test]
async fn an_own_record_under_the_id_of_a_stale_learned_one_is_kept_after_a_reconnect() {
    let first = hub().await;
    let addr = first.local_addr();
    let other = client(&first);
    other
        .register_now(Registration::new("svc@1.0.0").id("X").port(5000))
        .expect("register");
    let (a, mut events) =
        Client::connect_with_events([addr.to_string()], quick_reconnect()).expect("client");
    timeout(WAIT, a.get("svc")).await.expect("t").expect("g");
    first.shutdown().await;
    drop(other);
    event_where(&mut events, "disconnect", |e| {
        matches!(e, Event::Disconnect(_))
    })
    .await;
    // While X is stale (learned, unconfirmed), this client takes the id.
    a.register_now(Registration::new("svc@2.0.0").id("X").port(5001))
        .expect("register");
    let second = Hub::bind(addr, HubConfig::default()).await.expect("rebind");
    event_where(&mut events, "synced", |e| matches!(e, Event::Synced)).await;
    let mine = a.query("svc").expect("q");
    assert_eq!(mine.len(), 1, "the own record is gone: {mine:?}");
    assert_eq!(mine[0].port(), Some(5001));
    timeout(WAIT, async {
        while !second
            .query(&seaport::Pattern::all())
            .iter()
            .any(|r| r.id() == "X" && r.port() == Some(5001))
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the new hub holds the own record");
}
