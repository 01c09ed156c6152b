//! The HTTP router (`seaport route`): requests go by their Host header to the
//! live records of a `role@range`, as the original README's "http router"
//! example does with bouncy, but as a reverse proxy built on hyper.
//!
//! - [`routes`]: Host names to targets.
//! - [`backends`]: the live backends of each target, rebuilt from the hub's
//!   records and swapped whole; the power of two choices.
//! - [`proxy`]: one request, forwarded.
//! - [`forwarded`]: the headers that tell a backend who a request is from.

pub mod backends;
pub mod forwarded;
pub mod proxy;
pub mod routes;

use crate::client::Client;
use crate::transport::accept::{http1_server, next_connection, places};
use crate::transport::idle::{Activity, Watched};
use backends::Snapshot;
use forwarded::TrustedProxies;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use proxy::{ClientConnection, Proxy};
use routes::Routes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

/// The most bytes of request headers a client may send (more: 431).
pub const MAX_HEADERS: usize = 64 * 1024;

/// One worker per CPU: what `seaport route` and the supervisor's router run.
pub fn workers_per_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// How the router runs.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Where requests go.
    pub routes: Routes,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// How long a connection to a backend may take before another is tried.
    pub connect_timeout: Duration,
    /// How long a backend may take to begin its answer once it has the
    /// request (then 504).
    pub response_timeout: Duration,
    /// How long a client connection may move no byte either way: idle
    /// between requests, a body that stops coming or is not read, a silent
    /// tunnel. Longer than `response_timeout`, so that the backend's 504
    /// comes first.
    pub idle_timeout: Duration,
    /// Client connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long requests in flight may take to finish when the router stops.
    pub drain: Duration,
    /// Threads that serve connections, each with its own event loop and its
    /// own connections to the backends, as nginx's workers: a request and its
    /// backend connection never wake another thread, and no thread steals
    /// another's work. 1 (the default) serves on the caller's runtime.
    pub workers: usize,
    /// Proxies in front of the router whose forwarded headers are kept
    /// (default: none; every client's own are replaced).
    pub trusted: TrustedProxies,
}

impl RouterConfig {
    /// The routes, with the default limits.
    pub fn new(routes: Routes) -> RouterConfig {
        RouterConfig {
            routes,
            header_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            drain: Duration::from_secs(10),
            workers: 1,
            trusted: TrustedProxies::default(),
        }
    }
}

/// A running router. Dropping it stops it as [`Router::shutdown`] does, without
/// waiting for the requests in flight: its worker threads end by themselves.
#[derive(Debug)]
pub struct Router {
    addr: SocketAddr,
    routes: watch::Sender<Arc<Routes>>,
    /// Stops the workers when it is dropped.
    stop: DropGuard,
    task: JoinHandle<()>,
}

/// What the workers share: the cap on client connections, and the stop.
#[derive(Debug, Clone)]
struct Shared {
    proxy: Arc<Proxy>,
    config: Arc<RouterConfig>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
}

impl Router {
    /// Serves `listener`, routing to the records `client` learns from its hubs.
    pub fn serve(
        listener: TcpListener,
        client: Client,
        config: RouterConfig,
    ) -> std::io::Result<Router> {
        let addr = listener.local_addr()?;
        let (routes, routes_rx) = watch::channel(Arc::new(config.routes.clone()));
        let (snapshot_tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        tokio::spawn(backends::follow(client, routes_rx, snapshot_tx));
        let proxy = Arc::new(Proxy {
            snapshot,
            connect_timeout: config.connect_timeout,
            response_timeout: config.response_timeout,
            trusted: config.trusted.clone(),
        });
        let stop = CancellationToken::new();
        let shared = Shared {
            proxy,
            slots: places(config.max_connections),
            config: Arc::new(config),
            stop: stop.clone(),
        };
        let task = match shared.config.workers {
            0 | 1 => tokio::spawn(accept(listener, shared)),
            workers => {
                let listener = listener.into_std()?;
                let mut ended = Vec::with_capacity(workers);
                for worker in 1..=workers {
                    ended.push(spawn_worker(worker, listener.try_clone()?, shared.clone())?);
                }
                tokio::spawn(async move {
                    for worker in ended {
                        let _ = worker.await;
                    }
                })
            }
        };
        Ok(Router {
            addr,
            routes,
            stop: stop.drop_guard(),
            task,
        })
    }

    /// Routes by `routes` from now on (a reload of the routes file).
    pub fn set_routes(&self, routes: Routes) {
        self.routes.send_replace(Arc::new(routes));
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets the requests in flight finish for up to the
    /// configured `drain`, then drops what is left.
    pub async fn shutdown(self) {
        drop(self.stop);
        let _ = self.task.await;
    }
}

/// Starts worker thread `worker` (numbered from 1): its own single-threaded
/// runtime accepting from `listener` (a copy of the router's). The receiver
/// hears when it ends.
fn spawn_worker(
    worker: usize,
    listener: std::net::TcpListener,
    shared: Shared,
) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (ended, ended_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("router-{worker}"))
        .spawn(move || {
            backends::set_worker(worker);
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept(listener, shared).await,
                    Err(e) => tracing::error!("router worker {worker}: {e}"),
                }
            });
            let _ = ended.send(());
        })?;
    Ok(ended_rx)
}

/// Accepts connections until stopped, then drains them (see [`Router::shutdown`]):
/// each connection finishes its request in flight and closes, and those still
/// open after the drain deadline are dropped.
async fn accept(listener: TcpListener, shared: Shared) {
    let Shared {
        proxy,
        config,
        slots,
        stop,
    } = shared;
    // Every connection holds a receiver: the sender sees when all are gone.
    let (draining, watcher) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let builder = http1_server(config.header_timeout, MAX_HEADERS);
    while let Some((stream, peer, permit)) =
        next_connection(&listener, &slots, &mut connections, &stop, "router").await
    {
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let client = Arc::new(ClientConnection::new(peer, Arc::clone(&activity)));
        let proxy = Arc::clone(&proxy);
        let service = {
            let client = Arc::clone(&client);
            service_fn(move |req| {
                let (proxy, client) = (Arc::clone(&proxy), Arc::clone(&client));
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, &client).await) }
            })
        };
        let connection = builder
            .serve_connection(TokioIo::new(Watched::new(stream, activity)), service)
            .with_upgrades();
        let mut watcher = watcher.clone();
        let idle = config.idle_timeout;
        connections.spawn(async move {
            // The connection is dropped before a tunnel runs: an upgrade it
            // never handed over (the client went away first) fails at once.
            {
                let mut connection = std::pin::pin!(connection);
                let served = async {
                    tokio::select! {
                        ended = connection.as_mut() => ended,
                        () = until_draining(&mut watcher) => {
                            connection.as_mut().graceful_shutdown();
                            connection.as_mut().await
                        }
                    }
                };
                tokio::select! {
                    ended = served => if let Err(e) = ended {
                        tracing::debug!("router: connection from {peer}: {e}");
                    },
                    () = client.activity().silent_for(idle) => {
                        tracing::debug!("router: connection from {peer} silent for {idle:?}; closed");
                    }
                }
            }
            // An upgraded connection goes on as a tunnel, in this task: it
            // keeps its place under the cap, and the drain waits for it.
            if let Some(tunnel) = client.take_tunnel() {
                tokio::select! {
                    () = tunnel => {}
                    () = client.activity().silent_for(idle) => {
                        tracing::debug!("router: tunnel from {peer} silent for {idle:?}; closed");
                    }
                }
            }
            drop(watcher);
            drop(permit);
        });
    }
    drop(listener);
    drop(watcher);
    draining.send_replace(true);
    let deadline = config.drain;
    if tokio::time::timeout(deadline, draining.closed())
        .await
        .is_err()
    {
        tracing::warn!("router: requests still in flight after {deadline:?}; dropping them");
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Returns once the router drains.
async fn until_draining(watcher: &mut watch::Receiver<bool>) {
    // The guard it returns is dropped at once.
    let _ = watcher.wait_for(|draining| *draining).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;
    use crate::hub::{Hub, HubConfig};
    use crate::protocol::hub_addr::HubAddr;
    use std::time::Instant;

    /// Names of this process's threads.
    fn threads() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
            .map(|name| name.trim().to_string())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_router_stops_its_workers_and_its_listener() {
        let hub = Hub::bind("127.0.0.1:0", HubConfig::default())
            .await
            .expect("bind a hub");
        let (client, _) = Client::connect_to(
            vec![HubAddr::new("127.0.0.1", hub.local_addr().port())],
            ClientConfig::default(),
        )
        .expect("a client");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let router = Router::serve(
            listener,
            client,
            RouterConfig {
                workers: 3,
                ..RouterConfig::new(Routes::default())
            },
        )
        .expect("serve");
        let addr = router.local_addr();
        let workers = || {
            threads()
                .iter()
                .filter(|n| n.starts_with("router-"))
                .count()
        };
        // Each names itself when it starts.
        let deadline = Instant::now() + Duration::from_secs(10);
        while workers() < 3 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(workers(), 3, "{:?}", threads());
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        drop(router);
        let deadline = Instant::now() + Duration::from_secs(10);
        while (workers() > 0 || tokio::net::TcpStream::connect(addr).await.is_ok())
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(workers(), 0, "{:?}", threads());
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the router still accepts after it was dropped"
        );
        hub.shutdown().await;
    }
}
