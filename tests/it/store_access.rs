//! Hubs over an etcd that guards itself: one that serves its clients over TLS
//! and asks them for certificates, and one with authentication on. Hubs with
//! the right certificate or user share one registry through it; a hub with
//! the wrong ones says why in its log and goes on serving what it holds; bad
//! TLS or password files are refused at the start, naming the file.
//!
//! The certificates are made here (rcgen) for the test: a CA, the etcd
//! member's certificate for 127.0.0.1, and a client certificate for the hubs.

use crate::etcd::{Etcd, ServerTls};
use crate::harness::{HubProc, Raw, refused, wait_until};
use crate::store::{HEARTBEAT_MS, connection, ids_of, register_row};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A CA and the certificates it signed, as PEM files in a temporary
/// directory (test fixtures, made afresh for each test).
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA, its certificate written to `ca.pem`.
    fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("write ca.pem");
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names` (IP addresses or DNS names) signed by the
    /// CA, for a server and a client both: `NAME.pem` and `NAME-key.pem`.
    fn issue(&self, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Waits until the hub at `addr` holds exactly `want` of `role`.
fn wait_holds(addr: &str, role: &str, want: &BTreeSet<String>) {
    wait_until(&format!("{addr} holds {want:?} of {role}"), || {
        ids_of(addr, role) == *want
    });
}

fn ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn hubs_with_a_client_certificate_share_a_registry_through_an_etcd_over_tls() {
    let pki = Pki::new("seaport test CA");
    let (server_cert, server_key) = pki.issue("etcd", &["127.0.0.1", "localhost"]);
    let (hub_cert, hub_key) = pki.issue("hub", &["hub.test"]);
    let etcd = Etcd::single_tls(ServerTls {
        ca: pki.ca(),
        cert: server_cert,
        key: server_key,
    })
    .unwrap_or_else(|e| panic!("cannot start etcd with TLS: {e}"));
    let url = etcd.url();
    let ca = pki.ca();
    let tls = [
        "--store-ca",
        path(&ca),
        "--store-cert",
        path(&hub_cert),
        "--store-key",
        path(&hub_key),
    ];
    let hub = |extra: &[&str]| {
        let mut args = vec!["--heartbeat", HEARTBEAT_MS, "--store", &url];
        args.extend_from_slice(extra);
        HubProc::start(&args)
    };
    let a = hub(&tls);
    let b = hub(&tls);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
    let keys = etcd
        .etcdctl(&["get", "/seaport/records/", "--prefix", "--keys-only"])
        .unwrap_or_else(|e| panic!("etcdctl over TLS: {e}"));
    assert!(keys.contains("/seaport/records/W1"), "keys in etcd: {keys}");

    // Without a client certificate, and with another CA: refused by TLS,
    // said in the log with the reason, and the hub still serves.
    let no_cert = hub(&["--store-ca", path(&ca)]);
    let other = Pki::new("another CA");
    let other_ca = other.ca();
    let wrong_ca = hub(&["--store-ca", path(&other_ca)]);
    for (hub, what) in [
        (&no_cert, "no client certificate"),
        (&wrong_ca, "another CA"),
    ] {
        wait_until(&format!("the hub with {what} says it cannot watch"), || {
            hub.proc.stderr().contains("cannot watch the store")
        });
        let (mut raw, _, _) = Raw::connect_synced(&hub.addr());
        raw.send(&format!(r#"["heartbeat",{HEARTBEAT_MS}]"#));
        raw.send(&register_row("L1", "lonely", 7002));
        wait_holds(&hub.addr(), "lonely", &ids(&["L1"]));
        wait_until(
            &format!("the hub with {what} says its write failed"),
            || hub.proc.stderr().contains("cannot write to the store"),
        );
        raw.shutdown();
    }
    // The client's own check names its cause; a missing client certificate
    // shows as the alert or as the connection closed, as TLS 1.3 goes.
    let log = wrong_ca.proc.stderr();
    assert!(
        log.contains("UnknownIssuer"),
        "the log does not say why: {log}"
    );
    // Their writes failed: nothing of theirs is in etcd.
    let keys = etcd
        .etcdctl(&["get", "/seaport/", "--prefix", "--keys-only"])
        .unwrap_or_else(|e| panic!("etcdctl over TLS: {e}"));
    assert!(!keys.contains("L1"), "keys in etcd: {keys}");
}

/// An etcd with authentication on (see [`enable_users`]); its tokens expire
/// after a second, so that the hubs must sign in again.
fn etcd_with_users() -> Etcd {
    let etcd = Etcd::cluster_with(1, &["--auth-token-ttl=1".into()])
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    enable_users(&etcd);
    etcd
}

/// Adds a root user and a user `hubs` with read and write on `/seaport/`,
/// and turns authentication on.
fn enable_users(etcd: &Etcd) {
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "hubs:hubspw"],
        &["role", "add", "seaport"],
        &[
            "role",
            "grant-permission",
            "seaport",
            "--prefix=true",
            "readwrite",
            "/seaport/",
        ],
        &["user", "grant-role", "hubs", "seaport"],
        &["auth", "enable"],
    ] {
        etcd.etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    }
}

/// A hub over `etcd` signed in as `hubs` with the password in `file`.
fn hub_as_hubs(etcd: &Etcd, file: &Path) -> HubProc {
    HubProc::start(&[
        "--heartbeat",
        HEARTBEAT_MS,
        "--store",
        &etcd.url(),
        "--store-user",
        "hubs",
        "--store-password-file",
        path(file),
    ])
}

/// A file in `dir` holding the password of `hubs`.
fn password_file(dir: &tempfile::TempDir) -> PathBuf {
    let file = dir.path().join("password");
    std::fs::write(&file, "hubspw\n").expect("write the password");
    file
}

/// The keys under `/seaport/`, read as root.
fn keys_in(etcd: &Etcd) -> String {
    etcd.etcdctl(&[
        "--user",
        "root:rootpw",
        "get",
        "/seaport/",
        "--prefix",
        "--keys-only",
    ])
    .unwrap_or_else(|e| panic!("etcdctl: {e}"))
}

#[test]
fn hubs_sign_in_to_an_etcd_with_authentication() {
    let etcd = etcd_with_users();
    let dir = tempfile::tempdir().expect("temp dir");
    let good = password_file(&dir);
    let a = hub_as_hubs(&etcd, &good);
    let b = hub_as_hubs(&etcd, &good);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
    let keys = keys_in(&etcd);
    assert!(keys.contains("/seaport/records/W1"), "keys in etcd: {keys}");
    // Once the hubs' tokens have expired (a timer, so waited for): a new
    // connection's record, on a new lease, still goes through.
    std::thread::sleep(Duration::from_millis(2500));
    let _api = connection(&a.addr(), &[register_row("A1", "api", 7003)]);
    wait_holds(&b.addr(), "api", &ids(&["A1"]));

    // A wrong password: the hub says etcd refuses its user, and serves.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "nope\n").expect("write");
    let c = hub_as_hubs(&etcd, &bad);
    wait_until("the hub with a wrong password says so", || {
        c.proc.stderr().contains("refuses user \"hubs\"")
    });
    let _lonely = connection(&c.addr(), &[register_row("L1", "lonely", 7002)]);
    wait_holds(&c.addr(), "lonely", &ids(&["L1"]));
}

#[test]
fn a_hub_whose_password_was_changed_keeps_its_records_and_says_why() {
    let etcd = etcd_with_users();
    let dir = tempfile::tempdir().expect("temp dir");
    let password = password_file(&dir);
    let a = hub_as_hubs(&etcd, &password);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_until("W1 is in etcd", || {
        keys_in(&etcd).contains("/seaport/records/W1")
    });
    // The user is made again with another password: the hub's token is no
    // longer good, and signing in again with its password fails.
    for args in [
        &["--user", "root:rootpw", "user", "delete", "hubs"][..],
        &["--user", "root:rootpw", "user", "add", "hubs:changed"],
        &[
            "--user",
            "root:rootpw",
            "user",
            "grant-role",
            "hubs",
            "seaport",
        ],
    ] {
        etcd.etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?}: {e}"));
    }
    let _api = connection(&a.addr(), &[register_row("A1", "api", 7003)]);
    wait_until("the hub says its writes fail", || {
        a.proc.stderr().contains("cannot write to the store")
    });
    let log = a.proc.stderr();
    assert!(log.contains("authentication failed"), "{log}");
    assert!(!log.contains("refuses the write"), "{log}");
    assert_eq!(ids_of(&a.addr(), "api"), ids(&["A1"]));
}

#[test]
fn a_quiet_hub_watches_again_when_etcd_comes_back_after_its_token_expired() {
    let mut etcd = etcd_with_users();
    let dir = tempfile::tempdir().expect("temp dir");
    let password = password_file(&dir);
    let a = hub_as_hubs(&etcd, &password);
    let b = hub_as_hubs(&etcd, &password);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
    // Hub b writes nothing, so nothing renews its token: once it has
    // expired (a timer, so waited for), etcd goes and comes back, and b's
    // watch is made again with an expired token.
    std::thread::sleep(Duration::from_millis(2500));
    etcd.stop(0).unwrap_or_else(|e| panic!("stop etcd: {e}"));
    etcd.restart(0)
        .unwrap_or_else(|e| panic!("restart etcd: {e}"));
    let _api = connection(&a.addr(), &[register_row("A1", "api", 7003)]);
    wait_holds(&b.addr(), "api", &ids(&["A1"]));
    let log = b.proc.stderr();
    let ended = log.matches("the store ended the watch").count();
    assert!(
        ended <= 1,
        "hub b said {ended} times that etcd ended its watch: {log}"
    );
}

#[test]
fn a_hub_with_a_user_started_while_etcd_is_down_writes_once_it_is_up() {
    let mut etcd = etcd_with_users();
    let dir = tempfile::tempdir().expect("temp dir");
    let password = password_file(&dir);
    etcd.stop(0).unwrap_or_else(|e| panic!("stop etcd: {e}"));
    let a = hub_as_hubs(&etcd, &password);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&a.addr(), "web", &ids(&["W1"]));
    wait_until("the hub says it cannot sign in yet", || {
        a.proc.stderr().contains("cannot sign in to the store")
    });
    etcd.restart(0)
        .unwrap_or_else(|e| panic!("restart etcd: {e}"));
    let b = hub_as_hubs(&etcd, &password);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
}

#[test]
fn a_hub_given_a_user_uses_an_etcd_without_authentication_then_signs_in_once_it_is_on() {
    let etcd = Etcd::single().unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let password = password_file(&dir);
    let a = hub_as_hubs(&etcd, &password);
    let b = HubProc::start(&["--heartbeat", HEARTBEAT_MS, "--store", &etcd.url()]);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
    let log = a.proc.stderr();
    assert!(log.contains("the store has no authentication on"), "{log}");

    // Authentication goes on under the hub: its writes fail until it has
    // signed in, and wait; none is refused, and then they are written.
    enable_users(&etcd);
    let _api = connection(&a.addr(), &[register_row("A1", "api", 7003)]);
    wait_until("hub a signs in", || {
        a.proc.stderr().contains("signed in to the store")
    });
    wait_until("A1 is in etcd", || {
        keys_in(&etcd).contains("/seaport/records/A1")
    });
    assert_eq!(ids_of(&a.addr(), "api"), ids(&["A1"]));
    let log = a.proc.stderr();
    assert!(!log.contains("refuses the write"), "{log}");
}

#[test]
fn bad_store_credentials_and_certificates_are_refused_at_the_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let store = ["listen", "0", "--store", "etcd://127.0.0.1:2379"];
    let with = |extra: &[&str]| {
        let mut args = store.to_vec();
        args.extend_from_slice(extra);
        refused(&args)
    };
    let err = with(&["--store-ca", path(&not_pem)]);
    assert!(
        err.contains("store CA file") && err.contains(path(&not_pem)),
        "{err}"
    );
    let err = with(&["--store-ca", "/nonexistent/ca.pem"]);
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    let err = with(&[
        "--store-user",
        "hubs",
        "--store-password-file",
        path(&empty),
    ]);
    assert!(err.contains("first line is empty"), "{err}");
    // Flags that need another one.
    let err = with(&["--store-user", "hubs"]);
    assert!(err.contains("--store-password-file"), "{err}");
    let err = with(&["--store-ca", path(&not_pem), "--store-cert", path(&not_pem)]);
    assert!(err.contains("--store-key"), "{err}");
    let err = refused(&["listen", "0", "--store-ca", path(&not_pem)]);
    assert!(err.contains("--store"), "{err}");
    // The supervisor says first that its built-in hub is not used.
    let err = refused(&[
        "supervise",
        path(dir.path()),
        "--hub",
        "127.0.0.1:9090",
        "--store",
        "etcd://127.0.0.1:2379",
        "--store-ca",
        "/nonexistent/ca.pem",
    ]);
    assert!(err.contains("--store is for the built-in hub"), "{err}");
}
