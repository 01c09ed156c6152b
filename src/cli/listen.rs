//! `seaport listen`: run a hub until SIGINT or SIGTERM.

use crate::hub::{Hub, HubConfig};
use crate::protocol::keys::{Authorized, KeyError, KeyFile, Keypair, load_key_file};
use crate::supervise::Order;
use clap::Args;
use std::net::IpAddr;
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
    /// Authorized public keys: a file (JSON array, keypair, or PEM public key) or a
    /// directory of *.json, *.pem and *.pub files. Repeatable. SIGHUP reloads them.
    #[arg(long, value_name = "FILE|DIR")]
    authorized: Vec<PathBuf>,
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
    /// Peer with the hub at HOST:PORT (repeatable): records flow both ways.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Vec<crate::protocol::hub_addr::HubAddr>,
    /// Rows queued for a connection that is not reading before it is cut off.
    #[arg(long, default_value_t = 65536, value_name = "ROWS")]
    max_queue: usize,
}

pub(super) async fn run(args: ListenArgs) -> Result<(), String> {
    if args.heartbeat == 0 {
        return Err("--heartbeat must be at least 1 ms".into());
    }
    let mut config = HubConfig::with_heartbeat(Duration::from_millis(args.heartbeat));
    if let Some(timeout) = args.timeout {
        config.timeout = Duration::from_millis(timeout.max(1));
    }
    config.max_line = args.max_line.max(1);
    config.max_queue = args.max_queue.max(2);
    let keys = KeySources {
        files: args.keys,
        authorized: args.authorized,
    };
    let (authorized, keypair) = keys.load().map_err(|e| e.to_string())?;
    log_authorized(&authorized);
    config.authorized = authorized;
    config.keypair = keypair;
    raise_open_files_limit();
    let listener = crate::hub::listen_on(args.host, args.port)
        .await
        .map_err(|e| e.to_string())?;
    let mut orders = super::signals::orders()?;
    let hub = Hub::serve(listener, config);
    println!("seaport listening on :{}", hub.local_addr().port());
    for target in args.peer {
        hub.peer(target);
    }
    while let Some(Order::Reload) = orders.recv().await {
        match keys.load() {
            Ok((authorized, _)) => {
                tracing::info!("reloaded the authorized keys");
                log_authorized(&authorized);
                hub.set_authorized(authorized);
            }
            Err(e) => tracing::error!("keeping the authorized keys in force: {e}"),
        }
    }
    tracing::info!("stopping");
    hub.shutdown_for_exit().await;
    Ok(())
}

/// Where `listen` reads keys from, again on every SIGHUP.
struct KeySources {
    files: Vec<PathBuf>,
    authorized: Vec<PathBuf>,
}

impl KeySources {
    /// The authorized list (the union of every source) and the hub's own keypair.
    fn load(&self) -> Result<(Authorized, Option<Keypair>), KeyError> {
        let mut public = Vec::new();
        let mut keypair = None;
        for file in &self.files {
            match load_key_file(file)? {
                KeyFile::Authorized(keys) => public.extend(keys),
                KeyFile::Keypair(pair) => keypair = Some(*pair),
            }
        }
        let listed = Authorized::load(&self.authorized)?;
        Ok((Authorized::new(public).union(listed), keypair))
    }
}

fn log_authorized(authorized: &Authorized) {
    if authorized.is_open() {
        tracing::info!("no authorized keys: every connection may write");
    } else {
        tracing::info!(
            "{} authorized keys: only they may write; anyone may read",
            authorized.len()
        );
    }
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
