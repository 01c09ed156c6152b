//! The admin HTTP endpoint (`--admin ADDR:PORT` on `seaport listen` and
//! `seaport supervise`): read-only windows into a hub and a supervisor.
//!
//! - `GET /metrics`: Prometheus text ([`metrics`]).
//! - `GET /v1/records[?q=ROLE@RANGE]`, `GET /v1/services`: JSON ([`api`]).
//! - `GET /v1/events`: the records, then their changes, as server-sent
//!   events ([`events`]).
//! - `GET /healthz`: `ok`; `GET /`: the dashboard ([`dashboard`]).
//!
//! Anything else is 404, any other method 405. A client has
//! [`AdminConfig::header_timeout`] to send a request's headers, at most
//! [`AdminConfig::max_connections`] are served at once (more wait to be
//! accepted), and an event stream that falls [`AdminConfig::event_budget`]
//! bytes behind loses its place and starts again from the records as they
//! are: the hub never waits for an HTTP client.

pub mod api;
pub mod dashboard;
pub mod events;
pub mod metrics;

use crate::hub::HubView;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What the admin endpoint answers with.
pub type AdminBody = BoxBody<Bytes, Infallible>;

/// The limits the admin endpoint keeps.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Bytes of changes an event stream may fall behind before it loses its
    /// place (and starts again from the records as they are).
    pub event_budget: usize,
    /// How often an idle event stream sends a comment, so that proxies and
    /// browsers keep it open.
    pub keep_alive: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            header_timeout: Duration::from_secs(10),
            max_connections: 64,
            event_budget: 4 * 1024 * 1024,
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// What the admin endpoint shows: a hub's records and figures, a
/// supervisor's services, or both.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The hub, if this process runs one.
    pub hub: Option<HubView>,
    /// The supervisor, if this process is one.
    pub services: Option<crate::supervise::ServicesView>,
}

/// A running admin endpoint.
#[derive(Debug)]
pub struct Admin {
    addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Admin {
    /// Binds `addr` and serves `sources` on the current tokio runtime.
    pub async fn bind(
        addr: SocketAddr,
        sources: Sources,
        config: AdminConfig,
    ) -> std::io::Result<Admin> {
        let listener = TcpListener::bind(addr).await?;
        Admin::serve(listener, sources, config)
    }

    /// Serves `sources` on a listener the caller bound.
    pub fn serve(
        listener: TcpListener,
        sources: Sources,
        config: AdminConfig,
    ) -> std::io::Result<Admin> {
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept(listener, Arc::new(sources), config, stop.clone()));
        Ok(Admin { addr, stop, task })
    }

    /// The address it listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every connection, event streams included.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Reads `--admin`: `ADDR:PORT`, `[V6ADDR]:PORT`, or a bare `PORT` for
/// 127.0.0.1.
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    text.parse().map_err(|_| {
        format!("{text:?} is not ADDR:PORT or PORT (e.g. 127.0.0.1:9100, [::1]:9100, 9100)")
    })
}

/// Accepts connections until stopped; each is served until it ends, the
/// endpoint stops, or (an event stream) it falls too far behind.
async fn accept(
    listener: TcpListener,
    sources: Arc<Sources>,
    config: AdminConfig,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(
        config.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut connections = tokio::task::JoinSet::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .max_buf_size(MAX_HEADERS);
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("admin: cannot accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let service = {
            let sources = sources.clone();
            let config = config.clone();
            service_fn(move |req| {
                let sources = sources.clone();
                let config = config.clone();
                async move { Ok::<_, Infallible>(handle(req, &sources, &config, peer).await) }
            })
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::select! {
                ended = connection => {
                    if let Err(e) = ended {
                        tracing::debug!("admin: connection from {peer}: {e}");
                    }
                }
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

/// The most bytes of request headers a client may send (more: 431).
const MAX_HEADERS: usize = 16 * 1024;

/// Answers one request.
async fn handle(
    req: Request<Incoming>,
    sources: &Sources,
    config: &AdminConfig,
    peer: SocketAddr,
) -> Response<AdminBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{} is not allowed: the admin endpoint is read-only (GET)\n",
                req.method()
            ),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let query = req.uri().query().unwrap_or("");
    match req.uri().path() {
        "/" => dashboard::page(),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => metrics::scrape(sources).await,
        "/v1/records" => api::records(sources, query),
        "/v1/services" => api::services(sources).await,
        "/v1/events" => events::stream(sources, config, peer),
        path => text(StatusCode::NOT_FOUND, format!("not found: {path}\n")),
    }
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<AdminBody> {
    full(status, "text/plain; charset=utf-8", body)
}

/// An answer of `content_type` with the whole body at once.
pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is the state of now.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
