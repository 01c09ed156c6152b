//! How a hub reaches its etcd cluster: over TLS and as an etcd user where the
//! cluster asks for them, signing in until etcd lets it.

use super::{REQUEST_TIMEOUT, StoreConfig};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// An etcd user and its password, for a cluster with authentication on.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUser {
    /// The etcd user name.
    pub name: String,
    password: String,
}

impl fmt::Debug for StoreUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreUser")
            .field("name", &self.name)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl StoreUser {
    /// The user `name` with `password`.
    pub fn new(name: &str, password: &str) -> Self {
        StoreUser {
            name: name.into(),
            password: password.into(),
        }
    }

    /// The user `name` with the password on the first line of `file` (so that
    /// it is not on a command line, where every local user can read it).
    pub fn with_password_file(name: &str, file: &Path) -> Result<Self, String> {
        if name.is_empty() {
            return Err("the store's user name is empty".into());
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("store password file {}: {e}", file.display()))?;
        let password = text.lines().next().unwrap_or("").to_string();
        if password.is_empty() {
            return Err(format!(
                "store password file {}: the first line is empty",
                file.display()
            ));
        }
        Ok(StoreUser::new(name, &password))
    }
}

/// TLS to the etcd members: the CA that signed their certificates and, for a
/// cluster that asks for client certificates, this hub's certificate and key.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreTls {
    /// PEM of the CA certificates the members' certificates must chain to.
    pub ca: Vec<u8>,
    /// PEM of this hub's certificate and of its private key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for StoreTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreTls")
            .field("ca_bytes", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl StoreTls {
    /// Reads the CA file and, when given, the certificate and key files, and
    /// checks that TLS can be set up with them (the CA's certificates usable
    /// as such, the key readable and the certificate's); says which file is
    /// wrong and how.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, String> {
        let ca_pem = read_pem(ca, "store CA", "CERTIFICATE")?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, unusable) =
            roots.add_parsable_certificates(certificates(&ca_pem, ca, "store CA")?);
        if unusable > 0 || added == 0 {
            return Err(format!(
                "store CA file {}: {unusable} of its {} certificates cannot be used as a CA",
                ca.display(),
                added + unusable
            ));
        }
        let identity = match identity {
            Some((cert, key)) => {
                let cert_pem = read_pem(cert, "store certificate", "CERTIFICATE")?;
                let key_pem = read_pem(key, "store key", "PRIVATE KEY")?;
                let chain = certificates(&cert_pem, cert, "store certificate")?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    format!(
                        "store key file {}: no private key that can be read ({e}; an encrypted key must be decrypted first)",
                        key.display()
                    )
                })?;
                let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS to the store: {e}"))?
                    .with_root_certificates(roots)
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| {
                        format!(
                            "store certificate {} and key {}: {e}",
                            cert.display(),
                            key.display()
                        )
                    })?;
                Some((cert_pem, key_pem))
            }
            None => None,
        };
        Ok(StoreTls {
            ca: ca_pem,
            identity,
        })
    }
}

/// The certificates of PEM file `path`: at least one, each readable.
fn certificates(
    pem: &[u8],
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} file {}: no certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The contents of a PEM file that holds a block whose label ends in `label`
/// (`-----BEGIN ... CERTIFICATE-----`), or what is wrong with it.
fn read_pem(path: &Path, what: &str, label: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{what} file {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let found = text.lines().any(|line| {
        line.trim_end()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|name| name.ends_with(label))
    });
    if !found {
        return Err(format!(
            "{what} file {}: no PEM block \"-----BEGIN ...{label}-----\" in it",
            path.display()
        ));
    }
    Ok(pem)
}

/// The members' URLs: `https://` with TLS, else `http://`.
fn urls(store: &StoreConfig) -> Vec<String> {
    let scheme = if store.tls.is_some() { "https" } else { "http" };
    store
        .endpoints
        .iter()
        .map(|endpoint| format!("{scheme}://{endpoint}"))
        .collect()
}

/// How the hub's etcd client talks to the members. The user is not among
/// them: [`sign_in`] gives it, so that connecting does not wait for etcd.
fn options(store: &StoreConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(REQUEST_TIMEOUT)
        // etcd answers pings more often than every 5 s (its
        // --grpc-keepalive-min-time) by closing the connection.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if store.user.is_some() {
        // etcd's tokens expire (after 5 minutes by default).
        options = options.with_auto_token_refresh(true);
    }
    if let Some(tls) = &store.tls {
        let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(config);
    }
    options
}

/// An etcd client for the store. It does not wait for etcd: requests fail,
/// and are tried again, while etcd is away (or, with a user, until
/// [`sign_in`] has signed in).
pub(super) async fn connect(store: &StoreConfig) -> Result<Client, etcd_client::Error> {
    Client::connect(urls(store), Some(options(store))).await
}

/// Longest wait between two tries to sign in.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How often a failure to sign in that goes on is said again.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// Signs `client` (and every clone of it) in to etcd as `user`, trying
/// again until it works or `stop` comes, with the reason logged. Until
/// then the store's writes wait and its watch waits, as when etcd is away.
pub(super) async fn sign_in(mut client: Client, user: StoreUser, stop: CancellationToken) {
    let mut retry = Duration::from_millis(100);
    let mut reported: Option<Instant> = None;
    loop {
        let credentials = Some((user.name.clone(), user.password.clone()));
        let error = tokio::select! {
            signed = client.update_user(credentials) => match signed {
                Ok(()) => {
                    tracing::info!(user = %user.name, "signed in to the store");
                    return;
                }
                Err(e) => e,
            },
            () = stop.cancelled() => return,
        };
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            reported = Some(Instant::now());
            let reason = describe(&error);
            if reason.contains("authentication is not enabled") {
                tracing::warn!(
                    user = %user.name,
                    "the store has no authentication on: this hub uses it without signing in, \
                     and signs in once it is on"
                );
            } else if refused_sign_in(&error) {
                tracing::error!(
                    "the store refuses user {:?}: {reason}; trying again",
                    user.name
                );
            } else {
                tracing::warn!(
                    "cannot sign in to the store as {:?}: {reason}; trying again",
                    user.name
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
        retry = (retry * 2).min(MAX_RETRY);
    }
}

/// Whether etcd answered a sign-in with a refusal (rather than not at all).
fn refused_sign_in(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status) if matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition
    ))
}

/// An etcd client's error with its causes, which say what the error alone
/// does not (why a connection failed: refused, a TLS certificate, ...).
pub(super) fn describe(error: &etcd_client::Error) -> String {
    use std::error::Error;
    let mut text = error.to_string();
    let mut source = match error {
        etcd_client::Error::TransportError(e) => e.source(),
        etcd_client::Error::GRpcStatus(status) => status.source(),
        _ => None,
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn a_password_is_the_first_line_of_its_file_and_never_shown() {
        let f = file("s3cret\n");
        let user = StoreUser::with_password_file("hub", f.path()).expect("user");
        assert_eq!(user.password, "s3cret");
        assert!(!format!("{user:?}").contains("s3cret"));
        let empty = file("\nsecond\n");
        let err = StoreUser::with_password_file("hub", empty.path()).expect_err("empty");
        assert!(err.contains("first line is empty"), "{err}");
        let err = StoreUser::with_password_file("hub", Path::new("/nonexistent/pw"))
            .expect_err("missing");
        assert!(err.contains("/nonexistent/pw"), "{err}");
    }

    /// A CA and a certificate it signed, with the certificate's key.
    fn pki() -> (String, String, String) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["hub.test".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("certificate");
        (ca_cert.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_files_must_be_what_they_are_for() {
        let (ca, cert, key) = pki();
        let (_, _, other_key) = pki();
        let (ca, cert, key, other_key) = (file(&ca), file(&cert), file(&key), file(&other_key));
        let ok = |ca: &Path, cert: &Path, key: &Path| StoreTls::from_files(ca, Some((cert, key)));
        ok(ca.path(), cert.path(), key.path()).expect("a CA, a certificate and its key");
        StoreTls::from_files(ca.path(), None).expect("a CA alone");
        let crlf = file(
            &std::fs::read_to_string(ca.path())
                .expect("read")
                .replace('\n', "\r\n"),
        );
        StoreTls::from_files(crlf.path(), None).expect("a CA with CRLF line ends");

        let err = StoreTls::from_files(key.path(), None).expect_err("a key as the CA");
        assert!(
            err.contains("store CA file") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let garbage = file("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n");
        let err = StoreTls::from_files(garbage.path(), None).expect_err("not a certificate");
        assert!(err.contains("cannot be used as a CA"), "{err}");
        let err = ok(ca.path(), cert.path(), cert.path()).expect_err("a certificate as the key");
        assert!(err.contains("store key file"), "{err}");
        let encrypted = file(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAA==\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let err = ok(ca.path(), cert.path(), encrypted.path()).expect_err("an encrypted key");
        assert!(err.contains("decrypted first"), "{err}");
        let err = ok(ca.path(), cert.path(), other_key.path()).expect_err("another key");
        assert!(
            err.contains("store certificate")
                && err.contains(&other_key.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn with_tls_the_members_are_reached_over_https() {
        let mut store: StoreConfig = "etcd://127.0.0.1:2379,h:2380".parse().expect("store");
        assert_eq!(urls(&store), ["http://127.0.0.1:2379", "http://h:2380"]);
        store.tls = Some(StoreTls {
            ca: Vec::new(),
            identity: None,
        });
        assert_eq!(urls(&store), ["https://127.0.0.1:2379", "https://h:2380"]);
    }
}
