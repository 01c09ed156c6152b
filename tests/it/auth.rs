//! Authorized keys: only key holders write, anyone reads. Each property of the
//! signed mode is proved against the real hub binary over TCP.

use crate::harness::{Proc, Raw, fixture, node, node_ready, refused, seaport, wait_until};
use seaport::protocol::auth::{SessionKey, sign_challenge};
use seaport::protocol::keys::{Authorized, KeyFile, Keypair, load_key_file};
use seaport::protocol::wire::Row;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) fn key(name: &str) -> PathBuf {
    PathBuf::from(fixture(&format!("keys/{name}")))
}

pub(crate) fn pair(name: &str) -> Keypair {
    Keypair::load(&key(name)).expect("fixture keypair")
}

/// A file listing the public keys of the given fixture keypairs.
pub(crate) fn authorized_file(dir: &Path, names: &[&str]) -> PathBuf {
    let keys: Vec<String> = names.iter().map(|n| pair(n).public_pem()).collect();
    let path = dir.join("authorized.json");
    std::fs::write(&path, serde_json::to_string(&keys).expect("json")).expect("write");
    path
}

/// A hub run by the binary with its log written to a file.
pub(crate) struct LoggedHub {
    pub(crate) proc: Proc,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoggedHub {
    pub(crate) fn start(args: &[&str]) -> LoggedHub {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("hub.log");
        let mut all = vec!["listen", "0", "--host", "127.0.0.1"];
        all.extend_from_slice(args);
        let mut cmd = seaport(&all);
        cmd.env("SEAPORT_LOG", "info");
        let proc = Proc::spawn_logging_to("seaport listen (logged)", cmd, &log);
        let first = proc.line();
        let port = first
            .strip_prefix("seaport listening on :")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        LoggedHub {
            proc,
            port,
            log,
            _dir: dir,
        }
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Waits for a log line containing every one of `parts`.
    pub(crate) fn logged(&self, parts: &[&str]) -> String {
        logged_in(&self.log, parts)
    }
}

/// Waits until the file at `log` has a line containing every one of `parts`.
pub(crate) fn logged_in(log: &Path, parts: &[&str]) -> String {
    let mut found = String::new();
    wait_until(&format!("a log line with {parts:?}"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        match text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            Some(line) => {
                found = line.to_string();
                true
            }
            None => false,
        }
    });
    found
}

/// A raw connection that authenticated with a key and signs its writes.
pub(crate) struct Signer {
    pub(crate) raw: Raw,
    key: SessionKey,
    seq: u64,
}

impl Signer {
    pub(crate) fn connect(addr: &str, pair: &Keypair) -> Signer {
        let mut raw = Raw::connect(addr);
        assert_eq!(raw.row()[0], "helo");
        let challenge = raw.row();
        assert_eq!(
            challenge[0], "challenge",
            "a hub invites keys right after helo"
        );
        let signature = sign_challenge(pair, challenge[1].as_str().expect("nonce")).expect("sign");
        let auth = Row::Auth {
            public: pair.public_pem(),
            signature,
        };
        raw.send_bytes(&auth.encode()).expect("send auth");
        let sealed = loop {
            let row = raw.row();
            match row[0].as_str() {
                Some("session") => break row[1].as_str().expect("sealed").to_string(),
                Some("reject") => panic!("the hub refused the key: {row}"),
                _ => {}
            }
        };
        let key = SessionKey::open(pair, &sealed).expect("open the session key");
        Signer { raw, key, seq: 0 }
    }

    /// Signs `row` with the next sequence number; returns the line sent.
    pub(crate) fn write(&mut self, row: &str) -> Vec<u8> {
        self.seq += 1;
        let line = self.key.sign_row(self.seq, row.as_bytes()).to_vec();
        self.raw.send_bytes(&line).expect("send");
        line
    }
}

/// Reads rows until a `reject`; returns it.
pub(crate) fn next_reject(raw: &mut Raw) -> Value {
    loop {
        let row = raw.row();
        if row[0] == "reject" {
            return row;
        }
    }
}

pub(crate) fn register_row(id: &str) -> String {
    json!(["register", id, {"role": "web", "version": "1.0.0", "port": 4000, "host": "10.0.0.1"}])
        .to_string()
}

#[test]
fn keygen_prints_an_rsa_json_keypair_that_every_command_loads() {
    let out = seaport(&["keygen", "--bits", "2048"])
        .output()
        .expect("keygen");
    assert!(out.status.success());
    let pair: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        pair["public"]
            .as_str()
            .is_some_and(|p| p.starts_with("-----BEGIN RSA PUBLIC KEY-----"))
    );
    assert!(
        pair["private"]
            .as_str()
            .is_some_and(|p| p.starts_with("-----BEGIN RSA PRIVATE KEY-----"))
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("hub.json");
    std::fs::write(&file, &out.stdout).expect("write");
    // A keypair file is the hub's own key, as in the Node CLI.
    let hub = LoggedHub::start(&[file.to_str().expect("utf8")]);
    hub.logged(&["no authorized keys"]);
    let bad = seaport(&["keygen", "--bits", "1024"])
        .output()
        .expect("keygen");
    assert!(!bad.status.success());
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim(),
        "seaport: a 1024-bit key is too small: seaport needs RSA keys of at least 2048 bits"
    );
}

#[test]
fn a_key_too_small_is_refused_with_its_size_and_the_minimum() {
    // seaport 2.0.9's own test keys are 1022-bit RSA keys.
    let keys = node_ready().join("node_modules/seaport/test/keys");
    for (file, how) in [("beep.pem", "--authorized"), ("beep", "")] {
        let path = keys.join(file).to_string_lossy().into_owned();
        let mut args = vec!["listen", "0"];
        if !how.is_empty() {
            args.push(how);
        }
        args.push(&path);
        let out = seaport(&args).output().expect("listen");
        assert!(!out.status.success(), "{file} was accepted");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!(
                "seaport: {path}: a 1022-bit key is too small: seaport needs RSA keys of at least 2048 bits"
            )
        );
    }
}

#[test]
fn key_files_from_rsa_json_openssl_pkcs8_and_spki_all_load() {
    for private in [
        "alice.json",
        "openssl-genrsa.pem",
        "openssl-traditional.pem",
    ] {
        Keypair::load(&key(private)).unwrap_or_else(|e| panic!("{private}: {e}"));
    }
    let openssl = pair("openssl-genrsa.pem");
    for public in ["openssl-genrsa.rsapub.pem", "openssl-genrsa.spki.pem"] {
        let Ok(KeyFile::Authorized(keys)) = load_key_file(&key(public)) else {
            panic!("{public} does not load as a public key");
        };
        let authorized = Authorized::new(keys);
        assert!(
            authorized.allows(openssl.fingerprint()),
            "{public} is another key"
        );
    }
    // A directory of key files: keypairs give their public half.
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["alice.json", "openssl-genrsa.spki.pem"] {
        std::fs::copy(key(name), dir.path().join(name)).expect("copy");
    }
    let authorized = Authorized::load(&[dir.path().to_path_buf()]).expect("load dir");
    assert_eq!(authorized.len(), 2);
    assert!(authorized.allows(pair("alice.json").fingerprint()));
}

#[test]
fn bad_key_files_are_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"public": "nope"}"#).expect("write");
    let bad = bad.to_str().expect("utf8");
    let stderr = refused(&["listen", "0", bad]);
    assert!(stderr.contains(bad), "{stderr}");
    let stderr = refused(&["register", "9", "x@1.0.0", "--key", bad, "--", "true"]);
    assert!(stderr.contains(bad), "{stderr}");
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).expect("mkdir");
    std::fs::write(
        services.join("web.toml"),
        format!("role = \"web@1.0.0\"\ncommand = [\"true\"]\nkey = \"{bad}\"\n"),
    )
    .expect("write");
    let stderr = refused(&["supervise", "--check", services.to_str().expect("utf8")]);
    assert!(
        stderr.contains("web.toml: key: ") && stderr.contains(bad),
        "{stderr}"
    );
}

#[test]
fn a_secured_hub_takes_registrations_only_from_key_holders_and_serves_every_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json", "bob.json"]);
    let hub = LoggedHub::start(&["--authorized", list.to_str().expect("utf8")]);
    let service = fixture("service.py");
    let alice = key("alice.json");
    let _web = Proc::spawn(
        "seaport register --key alice",
        seaport(&[
            "register",
            &hub.addr(),
            "web@1.0.0",
            "--key",
            alice.to_str().expect("utf8"),
            "--",
            "python3",
            &service,
        ]),
    );
    let shown = || -> Value {
        let out = seaport(&["show", &hub.addr()]).output().expect("show");
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    wait_until("alice's service is registered", || {
        shown().as_array().is_some_and(|a| a.len() == 1)
    });
    hub.logged(&["authenticated", pair("alice.json").fingerprint().as_str()]);
    // A plain Node client reads from the secured hub.
    let query = node("client.js", &["query", &hub.addr(), "web"]);
    let answer = query.line_where("the query answer", |l| l.contains("\"query\""));
    assert!(answer.contains("\"web\""), "{answer}");

    // No key: refused with a visible reason, and the launcher stops.
    let launcher_log = dir.path().join("launcher.log");
    let cmd = seaport(&[
        "register",
        &hub.addr(),
        "web@1.0.0",
        "--",
        "python3",
        &service,
    ]);
    let mut plain = Proc::spawn_logging_to("seaport register without key", cmd, &launcher_log);
    let status = plain.wait();
    assert!(!status.success(), "an unsigned launcher must fail");
    logged_in(&launcher_log, &["refused", "not signed"]);
    hub.logged(&["refused register", "key=none", "not signed"]);

    // A key not on the list: refused, and the hub names the key.
    let mallory = key("mallory.json");
    let mut stranger = Proc::spawn(
        "seaport register --key mallory",
        seaport(&[
            "register",
            &hub.addr(),
            "web@1.0.0",
            "--key",
            mallory.to_str().expect("utf8"),
            "--",
            "python3",
            &service,
        ]),
    );
    assert!(!stranger.wait().success());
    hub.logged(&[
        "refused auth",
        pair("mallory.json").fingerprint().as_str(),
        "key not authorized",
    ]);
    assert_eq!(
        shown().as_array().map(Vec::len),
        Some(1),
        "only alice's record exists"
    );
}

#[test]
fn signed_writes_resist_forgery_replay_and_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json", "bob.json"]);
    let list = list.to_str().expect("utf8");
    let hub = LoggedHub::start(&["--authorized", list]);
    let other_hub = LoggedHub::start(&["--authorized", list]);
    let alice = pair("alice.json");
    let bob = pair("bob.json");
    let (mut reader, _, _) = Raw::connect_synced(&hub.addr());

    let mut a = Signer::connect(&hub.addr(), &alice);
    let captured = a.write(&register_row("R1"));
    assert_eq!(
        reader.row()[1],
        "R1",
        "a signed write is applied and forwarded"
    );

    // The same line again on the same connection: a replay.
    a.raw.send_bytes(&captured).expect("send");
    let reject = next_reject(&mut a.raw);
    assert_eq!(
        (reject[1].as_str(), reject[2].as_str()),
        (Some("register"), Some("R1"))
    );
    assert!(
        reject[3].as_str().is_some_and(|r| r.contains("replayed")),
        "{reject}"
    );

    // The captured line on another authenticated connection (another session key).
    let mut b = Signer::connect(&hub.addr(), &bob);
    b.raw.send_bytes(&captured).expect("send");
    let reject = next_reject(&mut b.raw);
    assert!(
        reject[3]
            .as_str()
            .is_some_and(|r| r.contains("bad signature")),
        "{reject}"
    );
    assert_eq!(reject[4], bob.fingerprint().as_str());
    hub.logged(&[
        "refused register R1",
        bob.fingerprint().as_str(),
        "bad signature",
    ]);

    // On a connection that never authenticated, and on another hub.
    let (mut anon, _, _) = Raw::connect_synced(&hub.addr());
    anon.send_bytes(&captured).expect("send");
    assert!(
        next_reject(&mut anon)[3]
            .as_str()
            .is_some_and(|r| r.contains("not authenticated"))
    );
    let mut elsewhere = Signer::connect(&other_hub.addr(), &alice);
    elsewhere.raw.send_bytes(&captured).expect("send");
    assert!(
        next_reject(&mut elsewhere.raw)[3]
            .as_str()
            .is_some_and(|r| r.contains("bad signature"))
    );

    // Tampered in flight: same MAC, other text.
    let Ok(Row::Signed { seq, mac, .. }) =
        Row::decode(&a.key.sign_row(a.seq + 1, register_row("R2").as_bytes()))
    else {
        panic!("signed row");
    };
    let tampered = Row::Signed {
        seq,
        text: register_row("R2").replace("10.0.0.1", "6.6.6.6"),
        mac,
    };
    a.raw.send_bytes(&tampered.encode()).expect("send");
    let reject = next_reject(&mut a.raw);
    assert_eq!(reject[2], "R2");
    assert!(
        reject[3]
            .as_str()
            .is_some_and(|r| r.contains("bad signature"))
    );

    // Unsigned writes are refused, with a reason the client can read.
    anon.send(&register_row("PLAIN"));
    let reject = next_reject(&mut anon);
    assert_eq!(reject[2], "PLAIN");
    assert!(reject[3].as_str().is_some_and(|r| r.contains("not signed")));
    hub.logged(&["refused register PLAIN", "key=none"]);

    // Every refused connection still reads: a new signed write reaches them all.
    a.seq += 1; // the tampered row used this number
    a.write(&register_row("R3"));
    for raw in [&mut reader, &mut anon, &mut b.raw] {
        let row = loop {
            let row = raw.row();
            if row[0] == "register" && row[1] == "R3" {
                break row;
            }
            assert_ne!(row[1], "R2", "a refused row was forwarded");
        };
        assert_eq!(row[2]["host"], "10.0.0.1");
    }
    let (_, _, dump) = Raw::connect_synced(&hub.addr());
    let ids: Vec<&str> = dump.iter().filter_map(|r| r[1].as_str()).collect();
    assert_eq!(ids, ["R1", "R3"]);
}

#[test]
fn sighup_rotates_the_authorized_keys_without_dropping_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    std::fs::copy(key("alice.json"), keys.join("alice.json")).expect("copy");
    let hub = LoggedHub::start(&["--authorized", keys.to_str().expect("utf8")]);
    let alice = pair("alice.json");
    let (mut reader, _, _) = Raw::connect_synced(&hub.addr());
    let mut a = Signer::connect(&hub.addr(), &alice);
    a.write(&register_row("BEFORE"));
    assert_eq!(reader.row()[1], "BEFORE");

    std::fs::remove_file(keys.join("alice.json")).expect("rm");
    std::fs::copy(key("bob.json"), keys.join("bob.json")).expect("copy");
    hub.proc.signal(nix::sys::signal::Signal::SIGHUP);
    hub.logged(&["reloaded the keys"]);

    a.write(&register_row("AFTER"));
    let reject = next_reject(&mut a.raw);
    assert!(
        reject[3]
            .as_str()
            .is_some_and(|r| r.contains("no longer authorized")),
        "{reject}"
    );
    // Nobody was disconnected: both connections still get forwarded rows.
    let mut b = Signer::connect(&hub.addr(), &pair("bob.json"));
    b.write(&register_row("BOB"));
    assert_eq!(reader.row()[1], "BOB");
    let row = loop {
        let row = a.raw.row();
        if row[0] == "register" {
            break row;
        }
    };
    assert_eq!(row[1], "BOB");
    assert!(!a.raw.closed_within(Duration::from_millis(200)));
}

/// Checks that `hub` still refuses a write that is not signed.
fn still_secured(hub: &LoggedHub) {
    let (mut plain, _, _) = Raw::connect_synced(&hub.addr());
    plain.send(&register_row("PLAIN"));
    let reject = next_reject(&mut plain);
    assert!(
        reject[3].as_str().is_some_and(|r| r.contains("not signed")),
        "{reject}"
    );
}

#[test]
fn authorized_keys_that_come_to_none_never_open_the_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("mkdir");
    // At start: a directory without a key is refused, not taken as "open".
    let err = refused(&["listen", "0", "--authorized", keys.to_str().expect("utf8")]);
    assert!(err.contains("names no key"), "{err}");
    assert!(err.contains(keys.to_str().expect("utf8")), "{err}");
    // On reload: a rotation caught between removing the old key and adding
    // the new one keeps the old key in force.
    std::fs::copy(key("alice.json"), keys.join("alice.json")).expect("copy");
    let hub = LoggedHub::start(&["--authorized", keys.to_str().expect("utf8")]);
    std::fs::remove_file(keys.join("alice.json")).expect("rm");
    hub.proc.signal(nix::sys::signal::Signal::SIGHUP);
    hub.logged(&["keeping the keys in force", "names no key"]);
    still_secured(&hub);
    let (mut reader, _, _) = Raw::connect_synced(&hub.addr());
    let mut alice = Signer::connect(&hub.addr(), &pair("alice.json"));
    alice.write(&register_row("ALICE"));
    assert_eq!(reader.row()[1], "ALICE");
}

#[test]
fn a_node_style_key_list_emptied_on_reload_keeps_the_keys_in_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json"]);
    let hub = LoggedHub::start(&[list.to_str().expect("utf8")]);
    std::fs::write(&list, "[]").expect("write");
    hub.proc.signal(nix::sys::signal::Signal::SIGHUP);
    hub.logged(&["keeping the keys in force", "no authorized key"]);
    still_secured(&hub);
}

#[test]
fn an_empty_list_leaves_the_hub_open_as_in_the_node_package() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").expect("write");
    let hub = LoggedHub::start(&[empty.to_str().expect("utf8")]);
    let (mut a, _, _) = Raw::connect_synced(&hub.addr());
    let (mut b, _, _) = Raw::connect_synced(&hub.addr());
    a.send(&register_row("OPEN"));
    assert_eq!(b.row()[1], "OPEN");
}

#[test]
fn supervised_services_sign_with_their_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json"]);
    let hub = LoggedHub::start(&["--authorized", list.to_str().expect("utf8")]);
    let services = dir.path().join("services.d");
    std::fs::create_dir(&services).expect("mkdir");
    let service = fixture("service.py");
    let alice = key("alice.json");
    std::fs::write(
        services.join("signed.toml"),
        format!(
            "role = \"signed@1.0.0\"\ncommand = [\"python3\", {service:?}]\nkey = {:?}\n",
            alice.to_str().expect("utf8")
        ),
    )
    .expect("write");
    std::fs::write(
        services.join("unsigned.toml"),
        format!("role = \"unsigned@1.0.0\"\ncommand = [\"python3\", {service:?}]\n"),
    )
    .expect("write");
    let control = dir.path().join("ctl.sock");
    let _sup = Proc::spawn(
        "seaport supervise",
        seaport(&[
            "supervise",
            services.to_str().expect("utf8"),
            "--hub",
            &hub.addr(),
            "--control",
            control.to_str().expect("utf8"),
        ]),
    );
    let ps = || -> Value {
        let out = seaport(&["ps", "--json", "--control", control.to_str().expect("utf8")])
            .output()
            .expect("ps");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    wait_until("the unsigned service fails with the hub's reason", || {
        ps().as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["name"] == "unsigned"
                    && r["state"] == "failed"
                    && r["message"].as_str().is_some_and(|m| m.contains("refused"))
            })
        })
    });
    wait_until("only the signed service is registered", || {
        let out = seaport(&["show", &hub.addr()]).output().expect("show");
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        shown
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["role"] == "signed")
    });
}

#[test]
fn peered_hubs_authenticate_with_their_own_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Hub A takes writes from alice, and knows hub B's key (bob.json) as a
    // hub's; not mallory.
    let list = authorized_file(dir.path(), &["alice.json"]);
    let bob = key("bob.json");
    // Short heartbeats (timeout 600 ms), so that B's liveness on A, carried by
    // its signed beats, is tested below within a second or two.
    let fast = ["--heartbeat", "200"];
    let a = LoggedHub::start(&[
        "--authorized",
        list.to_str().expect("utf8"),
        "--hub-key",
        bob.to_str().expect("utf8"),
        fast[0],
        fast[1],
    ]);
    let mallory = key("mallory.json");
    // Hub B is open to its own clients and peers with A using its keypair.
    let b = LoggedHub::start(&[
        bob.to_str().expect("utf8"),
        "--peer",
        &a.addr(),
        fast[0],
        fast[1],
    ]);
    a.logged(&["authenticated", pair("bob.json").fingerprint().as_str()]);
    let mut on_b = Raw::connect(&b.addr());
    on_b.keep_alive(Duration::from_millis(150), Duration::from_secs(5));
    on_b.send(&register_row("VIA-B"));
    wait_until("B's record reaches A through the signed link", || {
        let (_, _, dump) = Raw::connect_synced(&a.addr());
        dump.iter().any(|r| r[1] == "VIA-B")
    });
    // B's beats reach A signed and keep B's records there past A's timeout.
    std::thread::sleep(Duration::from_millis(1500));
    let (_, _, dump) = Raw::connect_synced(&a.addr());
    assert!(
        dump.iter().any(|r| r[1] == "VIA-B"),
        "B's record went from A although B is alive: its beats did not count"
    );
    // A's records reach B too.
    let mut signer = Signer::connect(&a.addr(), &pair("alice.json"));
    signer.write(&register_row("VIA-A"));
    wait_until("A's record reaches B", || {
        let (_, _, dump) = Raw::connect_synced(&b.addr());
        dump.iter().any(|r| r[1] == "VIA-A")
    });

    // A hub whose key is not on A's list cannot write there.
    let c = LoggedHub::start(&[mallory.to_str().expect("utf8"), "--peer", &a.addr()]);
    a.logged(&["refused auth", pair("mallory.json").fingerprint().as_str()]);
    let (mut on_c, _, _) = Raw::connect_synced(&c.addr());
    on_c.send(&register_row("VIA-C"));
    c.logged(&["peer refused"]);
    let (_, _, dump) = Raw::connect_synced(&a.addr());
    assert!(
        dump.iter().all(|r| r[1] != "VIA-C"),
        "an unauthorized peer wrote on A"
    );
}

/// A stamped register of another key's record, as hubs send them to each
/// other: version far ahead, owner the writer's own key.
fn stamped_takeover(id: &str, owner: &str) -> String {
    json!(["register", id,
        {"role": "web", "version": "1.0.0", "port": 6666, "host": "10.6.6.6"},
        {"o": "0123456789abcdef0123456789abcdef", "v": 9_000_000_000_000u64, "owner": owner}])
    .to_string()
}

#[test]
fn an_authorized_key_that_is_not_a_hubs_cannot_speak_as_a_hub() {
    let dir = tempfile::tempdir().expect("tempdir");
    let list = authorized_file(dir.path(), &["alice.json", "mallory.json"]);
    let a = LoggedHub::start(&["--authorized", list.to_str().expect("utf8")]);
    let mut alice = Signer::connect(&a.addr(), &pair("alice.json"));
    alice.write(&register_row("ALICE"));
    wait_until("alice's record is on the hub", || {
        let (_, _, dump) = Raw::connect_synced(&a.addr());
        dump.iter().any(|r| r[1] == "ALICE")
    });
    let mallory_key = pair("mallory.json").fingerprint().to_string();
    let mut mallory = Signer::connect(&a.addr(), &pair("mallory.json"));
    // A stamped row would pass by the owners' rule: refused.
    mallory.write(&stamped_takeover("ALICE", &format!("key:{mallory_key}")));
    let reject = next_reject(&mut mallory.raw);
    assert_eq!(reject[1], "register", "{reject}");
    assert_eq!(reject[2], "ALICE", "{reject}");
    assert!(
        reject[3]
            .as_str()
            .is_some_and(|r| r.contains("only a hub key")),
        "{reject}"
    );
    mallory.write(&json!(["free", "ALICE", {"o": "0123456789abcdef0123456789abcdef", "v": 9_000_000_000_001u64}]).to_string());
    let reject = next_reject(&mut mallory.raw);
    assert_eq!(reject[1], "free", "{reject}");
    // A beat for a hub, and the end of its dump, free nothing either.
    let alices_hub = {
        let (_, _, dump) = Raw::connect_synced(&a.addr());
        let alice = dump
            .iter()
            .find(|r| r[1] == "ALICE")
            .cloned()
            .expect("alice's record");
        alice.to_string()
    };
    mallory.write(
        &json!([
            "beat",
            "0123456789abcdef0123456789abcdef",
            9_000_000_000_000u64,
            1000
        ])
        .to_string(),
    );
    mallory.raw.send("[\"synced\"]");
    a.logged(&["ignored a beat", &mallory_key]);
    let (_, _, dump) = Raw::connect_synced(&a.addr());
    let now = dump
        .iter()
        .find(|r| r[1] == "ALICE")
        .cloned()
        .expect("alice's record is still there");
    assert_eq!(now.to_string(), alices_hub, "alice's record changed");
    assert_eq!(now[2]["port"], 4000);
    // The writer it was meant for is on: its own write is taken.
    alice.write(&json!(["register", "ALICE", {"role": "web", "version": "1.0.1", "port": 4000, "host": "10.0.0.1"}]).to_string());
    wait_until("alice's update is taken", || {
        let (_, _, dump) = Raw::connect_synced(&a.addr());
        dump.iter()
            .any(|r| r[1] == "ALICE" && r[2]["version"] == "1.0.1")
    });
}
