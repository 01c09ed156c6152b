//! How a hub reaches its etcd cluster: over TLS and as an etcd user where the
//! cluster asks for them, connecting until it answers.

use super::{REQUEST_TIMEOUT, StoreConfig};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// An etcd user and its password, for a cluster with authentication on.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUser {
    /// The etcd user name.
    pub name: String,
    /// Its password.
    pub password: String,
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
        Ok(StoreUser {
            name: name.into(),
            password,
        })
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
    /// Reads the CA file and, when given, the certificate and key files;
    /// says which file is wrong and how.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, String> {
        let ca = read_pem(ca, "store CA", "CERTIFICATE")?;
        let identity = match identity {
            Some((cert, key)) => Some((
                read_pem(cert, "store certificate", "CERTIFICATE")?,
                read_pem(key, "store key", "PRIVATE KEY")?,
            )),
            None => None,
        };
        Ok(StoreTls { ca, identity })
    }
}

/// The contents of a PEM file that holds a block whose label ends in `label`
/// (`-----BEGIN ... CERTIFICATE-----`), or what is wrong with it.
fn read_pem(path: &Path, what: &str, label: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{what} file {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    let found = text.lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
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

/// How the hub's etcd client talks to the members.
fn options(store: &StoreConfig) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(REQUEST_TIMEOUT)
        // etcd answers pings more often than every 5 s (its
        // --grpc-keepalive-min-time) by closing the connection.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some(user) = &store.user {
        options = options
            .with_user(user.name.clone(), user.password.clone())
            // etcd's tokens expire (after 5 minutes by default).
            .with_auto_token_refresh(true);
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

/// Longest wait between two tries to connect.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// How often a failure to connect that goes on is said again.
const REPORT_EVERY: Duration = Duration::from_secs(30);

/// An etcd client for the store, once one connects; `None` if `stop` comes
/// first. Without a user, connecting does not wait for etcd (requests fail
/// and are retried while it is away); with one, it signs in, which is tried
/// again until it works, with the reason logged.
pub(super) async fn connect(store: &StoreConfig, stop: &CancellationToken) -> Option<Client> {
    let urls = urls(store);
    let mut retry = Duration::from_millis(100);
    let mut reported: Option<Instant> = None;
    loop {
        let error = match Client::connect(&urls, Some(options(store))).await {
            Ok(client) => {
                if reported.is_some() {
                    tracing::info!("connected to the store at {}", store.endpoints.join(","));
                }
                return Some(client);
            }
            Err(e) => e,
        };
        if reported.is_none_or(|at| at.elapsed() >= REPORT_EVERY) {
            reported = Some(Instant::now());
            let members = store.endpoints.join(",");
            match (&store.user, refused_sign_in(&error)) {
                (Some(user), true) => tracing::error!(
                    "the store at {members} refuses user {:?}: {}; trying again",
                    user.name,
                    describe(&error)
                ),
                _ => tracing::warn!(
                    "cannot connect to the store at {members}: {}; trying again",
                    describe(&error)
                ),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return None,
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

    #[test]
    fn tls_files_must_hold_the_pem_blocks_they_are_for() {
        let cert = file("-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n");
        let key = file("-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n");
        let ec_key = file("-----BEGIN EC PRIVATE KEY-----\nAA==\n-----END EC PRIVATE KEY-----\n");
        StoreTls::from_files(cert.path(), Some((cert.path(), key.path()))).expect("pem files");
        StoreTls::from_files(cert.path(), Some((cert.path(), ec_key.path()))).expect("ec key");
        let err = StoreTls::from_files(key.path(), None).expect_err("a key as the CA");
        assert!(
            err.contains("store CA file") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let err = StoreTls::from_files(cert.path(), Some((cert.path(), cert.path())))
            .expect_err("a certificate as the key");
        assert!(err.contains("store key file"), "{err}");
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
