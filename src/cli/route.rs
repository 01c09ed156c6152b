//! `seaport route`: the HTTP router, until SIGINT or SIGTERM; SIGHUP reloads
//! a routes file.

use crate::client::{Client, ClientConfig};
use crate::protocol::hub_addr::HubAddr;
use crate::registry::pattern::Pattern;
use crate::router::forwarded::{ProxyRange, TrustedProxies};
use crate::router::routes::{Routes, Rule};
use crate::router::{Router, RouterConfig, workers_per_cpu};
use crate::supervise::Order;
use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub(super) struct RouteArgs {
    /// Port to listen on; 0 picks a free one.
    port: u16,
    /// A hub to learn the records from: HOST:PORT, or PORT for localhost.
    /// Repeatable; the router fails over between them.
    #[arg(long, required = true, value_name = "HOST:PORT")]
    hub: Vec<HubAddr>,
    /// Send requests for HOST (a name, or *.domain for every name below it)
    /// to the records of ROLE@RANGE. Repeatable.
    #[arg(long = "rule", value_name = "HOST=ROLE[@RANGE]")]
    rules: Vec<Rule>,
    /// Where requests for any other host go (else: 503).
    #[arg(long, value_name = "ROLE[@RANGE]")]
    default: Option<String>,
    /// Read the rules from a TOML file instead (`default = "ROLE@RANGE"` and a
    /// `[routes]` table of "HOST" = "ROLE@RANGE"); SIGHUP reloads it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["rules", "default"])]
    routes: Option<PathBuf>,
    /// Address to bind (default: every interface, IPv6 and IPv4).
    #[arg(long, value_name = "ADDR")]
    host: Option<IpAddr>,
    /// How long a client may take to send a request's headers.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    header_timeout: std::time::Duration,
    /// How long a backend may take to begin its answer (then 504).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = duration)]
    response_timeout: std::time::Duration,
    /// How long a client connection may move no byte either way before it is
    /// closed: idle keep-alive, a stalled body, a silent WebSocket.
    #[arg(long, default_value = "120s", value_name = "DURATION", value_parser = duration)]
    idle_timeout: std::time::Duration,
    /// How long requests in flight may take to finish on SIGTERM.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = duration)]
    drain: std::time::Duration,
    /// Client connections served at once; more wait to be accepted.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_connections: usize,
    /// Threads that serve connections, each with its own event loop and
    /// its own connections to the backends (default: one per CPU).
    #[arg(long, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    workers: Option<usize>,
    /// Keep the forwarded headers (X-Forwarded-For, X-Real-IP, Forwarded,
    /// X-Forwarded-Proto/Host) of clients in this range, proxies in front of
    /// the router, and append to X-Forwarded-For: an address or CIDR.
    /// Repeatable. Other clients' own are replaced by what the router saw.
    #[arg(long, value_name = "RANGE")]
    trust_forwarded: Vec<ProxyRange>,
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    crate::human::parse_duration(text).map_err(|e| e.to_string())
}

fn routes_of(args: &RouteArgs) -> Result<Routes, String> {
    if let Some(file) = &args.routes {
        return Routes::load(file);
    }
    let default = args
        .default
        .as_deref()
        .map(|d| Pattern::parse(d).map_err(|e| format!("--default {d:?}: {e}")))
        .transpose()?;
    if args.rules.is_empty() && default.is_none() {
        return Err(
            "nothing to route: give --rule HOST=ROLE[@RANGE], --default or --routes".into(),
        );
    }
    Routes::new(args.rules.clone(), default)
}

pub(super) async fn run(args: RouteArgs) -> Result<(), String> {
    let routes = routes_of(&args)?;
    let mut orders = super::signals::orders()?;
    let (client, _) =
        Client::connect_to(args.hub.clone(), ClientConfig::default()).map_err(|e| e.to_string())?;
    let listener = crate::hub::listen_on(args.host, args.port)
        .await
        .map_err(|e| e.to_string())?;
    super::listen::raise_open_files_limit();
    let config = RouterConfig {
        header_timeout: args.header_timeout,
        response_timeout: args.response_timeout,
        idle_timeout: args.idle_timeout,
        drain: args.drain,
        max_connections: args.max_connections,
        workers: args.workers.unwrap_or_else(workers_per_cpu),
        trusted: TrustedProxies::new(args.trust_forwarded.iter().copied()),
        ..RouterConfig::new(routes)
    };
    let router = Router::serve(listener, client.clone(), config).map_err(|e| e.to_string())?;
    super::say(format_args!(
        "seaport route listening on :{}",
        router.local_addr().port()
    ))?;
    while let Some(Order::Reload) = orders.recv().await {
        match routes_of(&args) {
            Ok(routes) => {
                tracing::info!("routes reloaded");
                router.set_routes(routes);
            }
            Err(e) => tracing::error!("{e}; keeping the routes in use"),
        }
    }
    tracing::info!("stopping: finishing the requests in flight");
    router.shutdown().await;
    client.close();
    Ok(())
}
