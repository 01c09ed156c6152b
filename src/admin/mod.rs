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
//! accepted), of which at most [`AdminConfig::max_event_streams`] event
//! streams (more get 503), and a connection whose client stops reading (a
//! write waits [`AdminConfig::stall_timeout`] for it) or that sends nothing
//! for as long between requests is closed.
//! An event stream that falls [`AdminConfig::event_budget`] bytes behind
//! loses its place and starts again from the records as they are: the hub
//! never waits for an HTTP client. Bound to a loopback address, the endpoint
//! answers only requests whose Host is an IP address or `localhost`, so
//! that a web page the operator visits cannot read it through a name of its
//! own (DNS rebinding).

pub mod api;
pub mod dashboard;
pub mod events;
pub mod metrics;

use crate::hub::HubView;
use crate::transport::accept::{http1_server, next_connection, places};
use crate::transport::idle::{Activity, Watched};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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
    /// Bytes an event stream's queued changes may weigh before it loses its
    /// place (and starts again from the records as they are): each change
    /// weighs its row, or the freed id, plus a fixed overhead for the entry,
    /// so that the budget bounds memory.
    pub event_budget: usize,
    /// How often an idle event stream sends a comment, so that proxies and
    /// browsers keep it open.
    pub keep_alive: Duration,
    /// Event streams served at once (fewer than `max_connections`, so that
    /// `/healthz` and `/metrics` always find a place); more get 503.
    pub max_event_streams: usize,
    /// How long a write may wait for the client to read (then it has
    /// stopped reading), or a connection stay silent between requests,
    /// before it is closed. An answer the endpoint is slow to make does not
    /// count.
    pub stall_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            header_timeout: Duration::from_secs(10),
            max_connections: 64,
            event_budget: 4 * 1024 * 1024,
            keep_alive: Duration::from_secs(15),
            max_event_streams: 32,
            stall_timeout: Duration::from_secs(45),
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
        let listener = crate::transport::accept::listen_async(addr)?;
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
        let served = Arc::new(Served {
            sources,
            event_slots: places(config.max_event_streams),
            host_guard: addr.ip().is_loopback(),
            config,
        });
        let task = tokio::spawn(accept(listener, served, stop.clone()));
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

/// What every request of the endpoint reads.
#[derive(Debug)]
struct Served {
    sources: Sources,
    config: AdminConfig,
    /// Places for event streams.
    event_slots: Arc<Semaphore>,
    /// Whether requests must name the host by address or `localhost`.
    host_guard: bool,
}

/// The kernel's send buffer for an admin connection: what a client that
/// stops reading can hold in the kernel, besides its event budget.
const SEND_BUFFER: usize = 256 * 1024;

/// Accepts connections until stopped; each is served until it ends, the
/// endpoint stops, its client stops reading, or (an event stream) it falls
/// too far behind.
async fn accept(listener: TcpListener, served: Arc<Served>, stop: CancellationToken) {
    let config = &served.config;
    let slots = places(config.max_connections);
    let mut connections = tokio::task::JoinSet::new();
    let builder = http1_server(config.header_timeout, MAX_HEADERS);
    while let Some((stream, peer, permit)) =
        next_connection(&listener, &slots, &mut connections, &stop, "admin").await
    {
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let activity = Activity::new();
        let service = {
            let served = served.clone();
            let activity = activity.clone();
            service_fn(move |req| {
                let served = served.clone();
                // From the request to the end of its answer, silence is the
                // endpoint's: only a write that waits counts against the client.
                let answering = activity.awaiting();
                async move {
                    let response = handle(req, &served, peer).await;
                    Ok::<_, Infallible>(response.map(|body| {
                        Holding {
                            body,
                            _held: answering,
                        }
                        .boxed()
                    }))
                }
            })
        };
        let connection = builder.serve_connection(
            TokioIo::new(Watched::new(stream, activity.clone())),
            service,
        );
        let stop = stop.clone();
        let stall = config.stall_timeout;
        connections.spawn(async move {
            tokio::select! {
                ended = connection => {
                    if let Err(e) = ended {
                        tracing::debug!("admin: connection from {peer}: {e}");
                    }
                }
                () = activity.stalled_for(stall) => {
                    tracing::info!("admin: {peer} has read nothing for {stall:?}, or sent nothing between requests; closing its connection");
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
async fn handle(req: Request<Incoming>, served: &Served, peer: SocketAddr) -> Response<AdminBody> {
    let (sources, config) = (&served.sources, &served.config);
    if served.host_guard && !names_this_machine(&req) {
        return text(
            StatusCode::FORBIDDEN,
            "the admin endpoint listens on loopback: name it by address or localhost in Host\n",
        );
    }
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
        "/v1/events" => match served.event_slots.clone().try_acquire_owned() {
            Ok(place) => events::stream(sources, config, peer)
                .map(|body| Holding { body, _held: place }.boxed()),
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} event streams are open, the most there may be; try again later\n",
                    config.max_event_streams
                ),
            ),
        },
        path => text(StatusCode::NOT_FOUND, format!("not found: {path}\n")),
    }
}

/// Whether a request's Host (if it has one) names this machine by address
/// or as `localhost`, not by a name a web page could point here.
fn names_this_machine(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(header::HOST) else {
        return true;
    };
    let Ok(authority) = hyper::http::uri::Authority::try_from(host.as_bytes()) else {
        return false;
    };
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// A body that holds something while it is sent: an event stream's place,
/// or the note that an answer is being made.
struct Holding<T> {
    body: AdminBody,
    _held: T,
}

impl<T: Unpin> hyper::body::Body for Holding<T> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
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
    let mut response = streamed(content_type, Full::new(body.into()).boxed());
    *response.status_mut() = status;
    response
}

/// A 200 answer of `content_type` whose body is sent as it is made.
pub(crate) fn streamed(content_type: &'static str, body: AdminBody) -> Response<AdminBody> {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Every answer is the state of now.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
