//! `seaport listen`: run a hub until SIGINT or SIGTERM.

use crate::admin::{Admin, AdminConfig, Sources};
use crate::hub::{Hub, HubConfig, KeyFiles};
use crate::supervise::Order;
use clap::Args;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub(super) struct ListenArgs {
    /// Port to listen on; 0 picks a free one.
    port: u16,
    /// Key files, as in the Node CLI: a JSON array is a list of authorized public
    /// keys; a JSON object (or PEM private key) is the hub's own keypair.
    #[arg(value_name = "KEY.json")]
    keys: Vec<PathBuf>,
    #[command(flatten)]
    access: AccessArgs,
    /// Address to bind (default: every interface, IPv6 and IPv4).
    #[arg(long, value_name = "ADDR")]
    host: Option<IpAddr>,
    /// Milliseconds between heartbeats.
    #[arg(long, default_value_t = 15000, value_name = "MS")]
    heartbeat: u64,
    /// Milliseconds of silence after which a connection is dropped (default 3 × heartbeat).
    #[arg(long, value_name = "MS")]
    timeout: Option<u64>,
    /// Longest accepted line in bytes; a longer one closes its connection.
    #[arg(long, default_value_t = crate::protocol::framing::DEFAULT_MAX_LINE, value_name = "BYTES")]
    max_line: usize,
    /// Largest record in bytes (its register row); a larger one is refused
    /// [default: 65536, or less to fit --max-line].
    #[arg(long, value_name = "BYTES")]
    max_record: Option<usize>,
    /// Peer with the hub at HOST:PORT (repeatable): records flow both ways.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Vec<crate::protocol::hub_addr::HubAddr>,
    /// Bytes of forwarded rows the hub keeps for connections that read slowly;
    /// one that falls further behind gets the latest state of what changed
    /// instead, once it reads again (never cut off).
    #[arg(long, default_value_t = crate::hub::DEFAULT_MAX_QUEUE_BYTES, value_name = "BYTES")]
    max_queue_bytes: usize,
    /// Serve the admin HTTP endpoint (metrics, JSON API, events, dashboard) on
    /// ADDR:PORT, or on 127.0.0.1:PORT when only a port is given (0 picks a
    /// free one); prints `seaport admin listening on ADDR:PORT`.
    #[arg(long, value_name = "ADDR:PORT", value_parser = crate::admin::parse_addr)]
    admin: Option<std::net::SocketAddr>,
    #[command(flatten)]
    store: StoreArgs,
}

/// Where a hub keeps its records (for `listen` and the supervisor's
/// built-in hub).
#[derive(Debug, Args)]
pub(super) struct StoreArgs {
    /// Keep the records in an etcd cluster, shared by every hub given the same
    /// store and prefix, instead of in this hub alone (not with --peer).
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    store: Option<crate::hub::StoreConfig>,
    /// Key prefix of the records in the store.
    #[arg(long, default_value = crate::hub::DEFAULT_PREFIX, value_name = "PREFIX", requires = "store")]
    store_prefix: String,
    /// Sign in to etcd as this user (a cluster with authentication on); its
    /// password is the first line of --store-password-file.
    #[arg(long, value_name = "NAME", requires_all = ["store", "store_password_file"])]
    store_user: Option<String>,
    /// The file holding the password of --store-user.
    #[arg(long, value_name = "FILE", requires = "store_user")]
    store_password_file: Option<PathBuf>,
    /// Reach etcd over TLS, trusting the members' certificates signed by the
    /// CA in this PEM file.
    #[arg(long, value_name = "FILE", requires = "store")]
    store_ca: Option<PathBuf>,
    /// This hub's client certificate (PEM), for members that ask for one.
    #[arg(long, value_name = "FILE", requires_all = ["store_ca", "store_key"])]
    store_cert: Option<PathBuf>,
    /// The private key (PEM) of --store-cert.
    #[arg(long, value_name = "FILE", requires = "store_cert")]
    store_key: Option<PathBuf>,
}

impl StoreArgs {
    /// Whether `--store` was given.
    pub(super) fn given(&self) -> bool {
        self.store.is_some()
    }

    /// The store to use, if any.
    pub(super) fn store(&self) -> Result<Option<crate::hub::StoreConfig>, String> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let mut store = store.clone().with_prefix(&self.store_prefix)?;
        if let (Some(name), Some(file)) = (&self.store_user, &self.store_password_file) {
            store.user = Some(crate::hub::StoreUser::with_password_file(name, file)?);
        }
        if let Some(ca) = &self.store_ca {
            let identity = self.store_cert.as_deref().zip(self.store_key.as_deref());
            store.tls = Some(crate::hub::StoreTls::from_files(ca, identity)?);
        }
        Ok(Some(store))
    }
}

/// Who may write to a hub: its keys and the ownership rule (for `listen` and
/// the supervisor's built-in hub).
#[derive(Debug, Args)]
pub(super) struct AccessArgs {
    /// Authorized public keys: a file (JSON array, keypair, or PEM public key) or a
    /// directory of *.json, *.pem and *.pub files. Repeatable. SIGHUP reloads them.
    #[arg(long, value_name = "FILE|DIR")]
    authorized: Vec<PathBuf>,
    /// Admin keys, as --authorized: their holders may also free any record.
    /// Repeatable; SIGHUP reloads them.
    #[arg(long = "admin-key", value_name = "FILE|DIR")]
    admin_key: Vec<PathBuf>,
    /// Hub keys, as --authorized: on a hub with authorized keys, only hubs holding
    /// one may write `seaport` records. Repeatable; SIGHUP reloads them.
    #[arg(long = "hub-key", value_name = "FILE|DIR")]
    hub_key: Vec<PathBuf>,
    /// On a hub without authorized keys too, only a record's owner may change or
    /// free it (the client that registered it).
    #[arg(long)]
    owned: bool,
}

impl AccessArgs {
    /// The key files, with `files` as the Node CLI takes them.
    pub(super) fn key_files(&self, files: Vec<PathBuf>) -> KeyFiles {
        KeyFiles {
            files,
            authorized: self.authorized.clone(),
            admin: self.admin_key.clone(),
            hubs: self.hub_key.clone(),
        }
    }

    /// Whether an open hub enforces owners.
    pub(super) fn owned(&self) -> bool {
        self.owned
    }
}

/// The least room for a record that `--max-line` must leave: a plain
/// register row with a little metadata.
const MIN_RECORD_ROOM: usize = 256;

pub(super) async fn run(args: ListenArgs) -> Result<(), String> {
    let mut config = HubConfig::with_heartbeat(super::heartbeat(args.heartbeat)?);
    config.store = args.store.store()?;
    if config.store.is_some() && !args.peer.is_empty() {
        return Err(
            "--peer and --store cannot be used together: hubs over a store share \
            every record through it, and relaying rows between them as well would \
            send each change twice and keep records the store has dropped"
                .into(),
        );
    }
    if let Some(timeout) = args.timeout {
        config.timeout = Duration::from_millis(timeout.max(1));
    }
    let min_line = crate::hub::ROW_OVERHEAD + MIN_RECORD_ROOM;
    if args.max_line < min_line {
        return Err(format!(
            "--max-line {} leaves no room for a record: a line must hold at least {min_line} bytes",
            args.max_line
        ));
    }
    config.max_line = args.max_line;
    let room = config.max_line.saturating_sub(crate::hub::ROW_OVERHEAD);
    config.max_record = match args.max_record {
        Some(max) if max > room => {
            return Err(format!(
                "--max-record {max} does not fit --max-line {}: a record must be at least {} bytes shorter than a line",
                config.max_line,
                crate::hub::ROW_OVERHEAD
            ));
        }
        Some(max) => max,
        None => crate::hub::DEFAULT_MAX_RECORD.min(room),
    };
    if config.store.is_some() && config.max_record > crate::hub::MAX_STORE_RECORD {
        return Err(format!(
            "--max-record {} is too large for --store: etcd takes records of at most {} bytes here",
            config.max_record,
            crate::hub::MAX_STORE_RECORD
        ));
    }
    config.max_queue_bytes = args.max_queue_bytes;
    let files = args.access.key_files(args.keys);
    let keys = files.load().map_err(|e| e.to_string())?;
    config.owned = args.access.owned();
    keys.log(config.owned);
    keys.apply_to(&mut config);
    raise_open_files_limit();
    let listener = crate::hub::listen_on(args.host, args.port)
        .await
        .map_err(|e| e.to_string())?;
    let mut orders = super::signals::orders()?;
    let hub = Hub::serve(listener, config);
    // The admin endpoint first: "listening" is said once everything asked
    // for is up.
    let admin = match args.admin {
        Some(addr) => {
            let sources = Sources {
                hub: Some(hub.view()),
                services: None,
            };
            match start_admin(addr, sources).await {
                Ok(admin) => Some(admin),
                Err(e) => {
                    hub.shutdown_for_exit().await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    super::say(format_args!(
        "seaport listening on :{}",
        hub.local_addr().port()
    ))?;
    if let Some(admin) = &admin {
        super::say(format_args!(
            "seaport admin listening on {}",
            admin.local_addr()
        ))?;
    }
    for target in args.peer {
        hub.peer(target);
    }
    while let Some(Order::Reload) = orders.recv().await {
        files.reload(&hub);
    }
    tracing::info!("stopping");
    if let Some(admin) = admin {
        admin.shutdown().await;
    }
    hub.shutdown_for_exit().await;
    Ok(())
}

/// Starts the admin endpoint of `--admin`.
pub(super) async fn start_admin(addr: SocketAddr, sources: Sources) -> Result<Admin, String> {
    let admin = Admin::bind(addr, sources, AdminConfig::default())
        .await
        .map_err(|e| format!("cannot serve the admin endpoint on {addr}: {e}"))?;
    Ok(admin)
}

/// A hub holds one descriptor per connection: lift the soft limit to the hard one.
pub(super) fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open files limit from {soft}: {e}");
    }
}
