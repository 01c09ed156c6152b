//! `seaport listen`: run a hub until SIGINT or SIGTERM.

use crate::hub::{Hub, HubConfig};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
pub(super) struct ListenArgs {
    /// Port to listen on; 0 picks a free one.
    port: u16,
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
    #[arg(long, default_value_t = crate::framing::DEFAULT_MAX_LINE, value_name = "BYTES")]
    max_line: usize,
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
    raise_open_files_limit();
    let listener = bind(args.host, args.port).await?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let hub = Hub::serve(listener, config);
    println!("seaport listening on :{}", hub.local_addr().port());
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    hub.shutdown().await;
    Ok(())
}

/// Binds the given address, or every interface: dual-stack IPv6 where the machine
/// has it, IPv4 otherwise.
async fn bind(host: Option<IpAddr>, port: u16) -> Result<TcpListener, String> {
    let addrs: Vec<SocketAddr> = match host {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => vec![
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        ],
    };
    let mut last = None;
    for addr in &addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(format!("cannot listen on {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| "no address to listen on".into()))
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
