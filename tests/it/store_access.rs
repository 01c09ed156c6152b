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
        raw.shutdown();
    }
    let log = wrong_ca.proc.stderr();
    assert!(
        log.to_lowercase().contains("certificate"),
        "the log of the hub trusting another CA does not say why: {log}"
    );
    // Nothing they were given reached the others.
    assert!(ids_of(&a.addr(), "lonely").is_empty());
}

#[test]
fn hubs_sign_in_to_an_etcd_with_authentication() {
    // Tokens that expire after a second, so that the hubs must sign in again.
    let etcd = Etcd::cluster_with(1, &["--auth-token-ttl=1".into()])
        .unwrap_or_else(|e| panic!("cannot start etcd: {e}"));
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
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::write(&good, "hubspw\n").expect("write");
    std::fs::write(&bad, "nope\n").expect("write");
    let url = etcd.url();
    let hub = |password: &Path| {
        HubProc::start(&[
            "--heartbeat",
            HEARTBEAT_MS,
            "--store",
            &url,
            "--store-user",
            "hubs",
            "--store-password-file",
            path(password),
        ])
    };
    let a = hub(&good);
    let b = hub(&good);
    let _web = connection(&a.addr(), &[register_row("W1", "web", 7001)]);
    wait_holds(&b.addr(), "web", &ids(&["W1"]));
    let keys = etcd
        .etcdctl(&[
            "--user",
            "root:rootpw",
            "get",
            "/seaport/records/",
            "--prefix",
            "--keys-only",
        ])
        .unwrap_or_else(|e| panic!("etcdctl: {e}"));
    assert!(keys.contains("/seaport/records/W1"), "keys in etcd: {keys}");
    // Once the hubs' tokens have expired (a timer, so waited for): a new
    // connection's record, on a new lease, still goes through.
    std::thread::sleep(Duration::from_millis(2500));
    let _api = connection(&a.addr(), &[register_row("A1", "api", 7003)]);
    wait_holds(&b.addr(), "api", &ids(&["A1"]));

    // A wrong password: the hub says etcd refuses its user, and serves.
    let c = hub(&bad);
    wait_until("the hub with a wrong password says so", || {
        c.proc.stderr().contains("refuses user \"hubs\"")
    });
    let _lonely = connection(&c.addr(), &[register_row("L1", "lonely", 7002)]);
    wait_holds(&c.addr(), "lonely", &ids(&["L1"]));
    assert!(ids_of(&a.addr(), "lonely").is_empty());
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
}
