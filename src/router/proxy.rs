//! One request through the router: its Host chooses the target, the power of
//! two choices a backend, and the request goes there with its body streaming
//! both ways. A backend that cannot be connected to was not sent the request,
//! so another is tried; with no backend left the answer is 502, and with none
//! at all 503 `service not available`.

use super::backends::{InFlight, Snapshot, pick};
use super::forwarded::TrustedProxies;
use super::routes::RequestHost;
use crate::transport::idle::Activity;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

/// What the router answers with: a backend's body, or its own.
pub type RouterBody = BoxBody<Bytes, hyper::Error>;

/// The headers that belong to one connection, not to the message (RFC 9110
/// §7.6.1), besides those a `Connection` header names. `TE: trailers` is
/// passed on by itself.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// The methods the router forwards, for a 405's `Allow`: any but CONNECT;
/// these are the registered ones a backend may serve.
const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// What every request needs: the routes and live backends, the limits.
#[derive(Debug)]
pub struct Proxy {
    pub(super) snapshot: watch::Receiver<Arc<Snapshot>>,
    pub(super) connect_timeout: Duration,
    pub(super) response_timeout: Duration,
    pub(super) trusted: TrustedProxies,
}

/// A tunnel's bytes both ways, run by its client connection's task once the
/// connection has switched protocols.
pub type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the requests of one client connection share: where it comes from,
/// its activity, and the tunnel an upgrade leaves for its task to run (so
/// that a tunnel counts as the connection it was, for the cap, the drain and
/// the idle timeout).
#[derive(Debug)]
pub struct ClientConnection {
    peer: SocketAddr,
    activity: Arc<Activity>,
    tunnel: Mutex<Option<TunnelSlot>>,
}

/// A tunnel, held until its connection's task takes it.
struct TunnelSlot(Tunnel);

impl std::fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnel")
    }
}

impl ClientConnection {
    /// A connection from `peer`.
    pub fn new(peer: SocketAddr, activity: Arc<Activity>) -> ClientConnection {
        ClientConnection {
            peer,
            activity,
            tunnel: Mutex::new(None),
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// When it last moved a byte.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The tunnel an upgrade left, if any.
    pub fn take_tunnel(&self) -> Option<Tunnel> {
        let mut slot = self.tunnel.lock().unwrap_or_else(PoisonError::into_inner);
        slot.take().map(|TunnelSlot(tunnel)| tunnel)
    }

    fn leave_tunnel(&self, tunnel: Tunnel) {
        let mut slot = self.tunnel.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(TunnelSlot(tunnel));
    }
}

impl Proxy {
    /// Forwards `req`, from `client`, to a backend of its Host's target.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: &ClientConnection,
    ) -> Response<RouterBody> {
        let peer = client.peer;
        if req.method() == hyper::Method::CONNECT {
            let mut refused = answer(
                StatusCode::METHOD_NOT_ALLOWED,
                "the router forwards requests, it does not open tunnels (CONNECT)\n",
            );
            refused
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(FORWARDED_METHODS));
            return refused;
        }
        let host = match request_host(&req) {
            Ok(host) => host,
            Err(why) => return answer(StatusCode::BAD_REQUEST, why),
        };
        let (snapshot, target) = self.backends(host.as_ref());
        if target.is_none_or(|t| snapshot.table.backends(t).is_empty()) {
            return unavailable();
        }
        let upgrade = upgrade_of(&req);
        let sent_host = host.as_ref().map(RequestHost::as_str);
        prepare(&mut req, peer, sent_host, upgrade.as_ref(), &self.trusted);
        let client_side = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
        // A request without a body whose method may be repeated (RFC 9110
        // §9.2.2) can be sent again after a backend failed it.
        let again =
            (upgrade.is_none() && req.body().is_end_stream() && req.method().is_idempotent())
                .then(|| Head::of(&req));
        let mut req = req.map(Outgoing::of);
        let mut tried = Vec::new();
        loop {
            // Read anew for every try: a backend registered while the last
            // one failed may take the request, and one freed is not tried.
            let (snapshot, target) = self.backends(host.as_ref());
            let backends = target.map_or(&[][..], |t| snapshot.table.backends(t));
            let Some(backend) = pick(backends, &tried, &mut rand::rng()) else {
                return answer(StatusCode::BAD_GATEWAY, "no backend could be reached\n");
            };
            let in_flight = InFlight::new(backend);
            match self
                .send(req, &in_flight, upgrade.is_some(), &client.activity)
                .await
            {
                Sent::Answered(response, connection) => {
                    return match client_side {
                        Some(client_side)
                            if response.status() == StatusCode::SWITCHING_PROTOCOLS =>
                        {
                            tunnel(response, client_side, in_flight, client)
                        }
                        _ => {
                            let mut response = response;
                            strip_hop_by_hop(response.headers_mut());
                            response.map(|body| {
                                Counted {
                                    body,
                                    in_flight,
                                    connection,
                                }
                                .boxed()
                            })
                        }
                    };
                }
                Sent::TimedOut => {
                    in_flight
                        .backend()
                        .warn(format_args!("no answer within {:?}", self.response_timeout));
                    return answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the backend did not answer in time\n",
                    );
                }
                Sent::NotDelivered(back) => {
                    tried.push(in_flight.backend().id.clone());
                    req = *back;
                }
                Sent::Failed(e) => {
                    in_flight.backend().warn(format_args!("{e}"));
                    match &again {
                        Some(head) => {
                            tried.push(in_flight.backend().id.clone());
                            req = head.request();
                        }
                        None => return answer(StatusCode::BAD_GATEWAY, "the backend failed\n"),
                    }
                }
            }
        }
    }

    /// The live snapshot, and the target of `host` in it (`None`: no route).
    fn backends(&self, host: Option<&RequestHost>) -> (Arc<Snapshot>, Option<usize>) {
        let snapshot = self.snapshot.borrow().clone();
        let target = snapshot.routes.lookup(host);
        (snapshot, target)
    }

    /// Sends `req` to the backend of `in_flight`: on an idle kept-alive
    /// connection if there is one (a connection that turns out closed gives
    /// the request back, and the next one is tried), else on a new one. An
    /// upgrade always takes a new connection.
    async fn send(
        &self,
        mut req: Request<Outgoing>,
        in_flight: &InFlight,
        upgrade: bool,
        activity: &Arc<Activity>,
    ) -> Sent {
        let backend = in_flight.backend();
        let body = req.body().sent();
        if !upgrade {
            while let Some(mut sender) = backend.take_idle() {
                // Its last exchange has ended; the connection may not have
                // noticed yet.
                if sender.ready().await.is_err() {
                    continue;
                }
                let sent = self.answer_of(sender.try_send_request(req), body.as_deref(), activity);
                match sent.await {
                    Some(Ok(response)) => {
                        return Sent::Answered(response, Some(Kept { sender, body }));
                    }
                    Some(Err(mut e)) => match e.take_message() {
                        Some(back) => req = back,
                        None => return Sent::Failed(e.into_error()),
                    },
                    None => return Sent::TimedOut,
                }
            }
        }
        let connect = TcpStream::connect((backend.host.as_str(), backend.port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                backend.warn(format_args!("cannot connect ({e}); trying another"));
                return Sent::NotDelivered(Box::new(req));
            }
            Err(_) => {
                backend.warn(format_args!(
                    "no connection within {:?}; trying another",
                    self.connect_timeout
                ));
                return Sent::NotDelivered(Box::new(req));
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(handshake) => handshake,
                Err(e) => return Sent::Failed(e),
            };
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("backend connection: {e}");
            }
        });
        let sent = self.answer_of(sender.try_send_request(req), body.as_deref(), activity);
        match sent.await {
            Some(Ok(response)) if upgrade => Sent::Answered(response, None),
            Some(Ok(response)) => Sent::Answered(response, Some(Kept { sender, body })),
            Some(Err(mut e)) => match e.take_message() {
                Some(back) => Sent::NotDelivered(Box::new(back)),
                None => Sent::Failed(e.into_error()),
            },
            None => Sent::TimedOut,
        }
    }

    /// The backend's answer, unless its head has not come within the
    /// response timeout, counted from when the request's `body` (if it has
    /// one) has gone out whole: a slow upload is the client's time, bounded
    /// by the idle timeout, not the backend's. While the answer is awaited,
    /// the client connection is not silent (its `activity` is paused).
    async fn answer_of<R>(
        &self,
        answer: impl Future<Output = R>,
        body: Option<&BodySent>,
        activity: &Arc<Activity>,
    ) -> Option<R> {
        let timer = async {
            if let Some(body) = body {
                body.wait().await;
            }
            let _busy = activity.awaiting();
            tokio::time::sleep(self.response_timeout).await;
        };
        tokio::select! {
            biased;
            answer = answer => Some(answer),
            () = timer => None,
        }
    }
}

/// A connection that may take another request once the exchange on it has
/// ended: its response body read, and its request `body` (if it had one)
/// sent whole. A backend may answer before it has read the body (a 401, a
/// 413): until the body is sent the connection is not free.
struct Kept {
    sender: SendRequest<Outgoing>,
    body: Option<Arc<BodySent>>,
}

/// Whether a request's body has gone out whole.
#[derive(Debug, Default)]
pub struct BodySent {
    done: AtomicBool,
    notify: Notify,
}

impl BodySent {
    fn set(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Returns once the body has gone out whole.
    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

/// How an attempt on one backend ended.
enum Sent {
    /// With a response, and the connection to keep once the exchange ends.
    Answered(Response<Incoming>, Option<Kept>),
    /// Before the request went out: it is given back, for another backend.
    NotDelivered(Box<Request<Outgoing>>),
    /// After it went out.
    Failed(hyper::Error),
    /// It went out, and no answer came within the response timeout.
    TimedOut,
}

/// A 101 answer: passes it to the client, and leaves to `client`'s task the
/// bytes both ways once both sides have switched.
fn tunnel(
    mut response: Response<Incoming>,
    client_side: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
    client: &ClientConnection,
) -> Response<RouterBody> {
    let backend_side = hyper::upgrade::on(&mut response);
    client.leave_tunnel(Box::pin(async move {
        let _in_flight = in_flight;
        match tokio::try_join!(client_side, backend_side) {
            Ok((client, backend)) => {
                let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                    tracing::debug!("upgraded connection: {e}");
                }
            }
            Err(e) => tracing::debug!("upgrade: {e}"),
        }
    }));
    response.map(|body| body.boxed())
}

/// The protocol a request asks to switch to (`Connection: upgrade` and an
/// `Upgrade` header, in HTTP/1.1: RFC 9110 §7.8 has an HTTP/1.0 request's
/// ignored), kept across the hop.
fn upgrade_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    let headers = req.headers();
    let asks = req.version() == hyper::Version::HTTP_11
        && tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The host a request is for: the authority of an absolute-form target, else
/// its one `Host` header (RFC 9112 §3.2: two is a bad request, and so is none
/// in HTTP/1.1; an HTTP/1.0 request without one has no host, and goes to the
/// default route).
fn request_host<B>(req: &Request<B>) -> Result<Option<RequestHost>, &'static str> {
    if let Some(authority) = req.uri().authority() {
        return RequestHost::parse(authority.as_str())
            .map(Some)
            .ok_or("the request's target is not a host name and port\n");
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => host
            .to_str()
            .ok()
            .and_then(RequestHost::parse)
            .map(Some)
            .ok_or("the Host header is not a host name and port\n"),
        (None, _) if req.version() < hyper::Version::HTTP_11 => Ok(None),
        (None, _) => Err("a request needs a Host header\n"),
        (Some(_), Some(_)) => Err("a request has one Host header, not two\n"),
    }
}

/// Makes a received request one to send on: origin-form target, no
/// hop-by-hop headers (but an upgrade's: `Upgrade` without `Connection:
/// upgrade` is dropped), and the forwarded headers.
fn prepare(
    req: &mut Request<Incoming>,
    peer: SocketAddr,
    host: Option<&str>,
    upgrade: Option<&HeaderValue>,
    trusted: &TrustedProxies,
) {
    if let Some(path) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = path.into();
    }
    let trailers = accepts_trailers(req.headers());
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    headers.remove(header::UPGRADE);
    // The host it was routed by, whatever `Connection` named; it is also
    // the forwarded host.
    let host = host.and_then(|host| HeaderValue::from_str(host).ok());
    if let Some(value) = &host {
        headers.insert(header::HOST, value.clone());
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
    trusted.apply(headers, peer, host.as_ref());
}

/// Whether a request's `TE` asks for trailers.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    tokens(headers, header::TE).any(|t| t.eq_ignore_ascii_case("trailers"))
}

/// The comma-separated tokens of every `name` header, trimmed.
fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes the hop-by-hop headers, and those the `Connection` header names.
/// A message framed by `Transfer-Encoding` loses its `Content-Length` too
/// (RFC 9112 §6.3): the next hop frames it anew.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = tokens(headers, header::CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// 503 with the seed's body.
fn unavailable() -> Response<RouterBody> {
    answer(StatusCode::SERVICE_UNAVAILABLE, "service not available\n")
}

/// The router's own answer.
pub fn answer(status: StatusCode, text: &'static str) -> Response<RouterBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// The head of a request without a body, kept to send it again.
struct Head {
    method: hyper::Method,
    uri: hyper::Uri,
    version: hyper::Version,
    headers: HeaderMap,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    /// The request again, with its empty body.
    fn request(&self) -> Request<Outgoing> {
        let mut req = Request::new(Outgoing::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// What goes to a backend: the client's body as it streams in, noting when
/// it has gone out whole, or nothing (none was sent, or a request sent again).
#[derive(Debug)]
pub enum Outgoing {
    /// The client's body.
    Stream(Incoming, Arc<BodySent>),
    /// No body.
    Empty,
}

impl Outgoing {
    /// What goes on of a client's `body`.
    fn of(body: Incoming) -> Outgoing {
        if body.is_end_stream() {
            Outgoing::Empty
        } else {
            Outgoing::Stream(body, Arc::default())
        }
    }

    /// The flag raised once the body has gone out, for one that has a body.
    fn sent(&self) -> Option<Arc<BodySent>> {
        match self {
            Outgoing::Stream(_, sent) => Some(Arc::clone(sent)),
            Outgoing::Empty => None,
        }
    }
}

impl Body for Outgoing {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Outgoing::Stream(body, sent) => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let ended = match &polled {
                    Poll::Ready(None) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    _ => false,
                };
                if ended {
                    sent.set();
                }
                polled
            }
            Outgoing::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Outgoing::Stream(body, _) => body.is_end_stream(),
            Outgoing::Empty => true,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Outgoing::Stream(body, _) => body.size_hint(),
            Outgoing::Empty => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// A backend's response body, counting its request in flight until it ends;
/// then its connection goes back to the backend's idle ones (if its request
/// has gone out whole too). A body dropped before its end takes its
/// connection with it.
struct Counted {
    body: Incoming,
    in_flight: InFlight,
    connection: Option<Kept>,
}

impl Counted {
    fn keep_connection(&mut self) {
        if let Some(Kept { sender, body }) = self.connection.take()
            && body.is_none_or(|body| body.is_done())
        {
            self.in_flight.backend().put_idle(sender);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.keep_connection();
        }
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // Trailers are the last frame: hyper's server stops polling there.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            _ => false,
        };
        if ended {
            self.keep_connection();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_targets_authority_or_the_one_host_header() {
        let absolute = Request::get("http://user@stable/").body(()).unwrap();
        assert!(request_host(&absolute).is_err());
        let absolute = Request::get("http://stable:8080/x").body(()).unwrap();
        let host = request_host(&absolute).unwrap().unwrap();
        assert_eq!(host.as_str(), "stable:8080");
        let none = Request::get("/").body(()).unwrap();
        assert!(request_host(&none).is_err(), "HTTP/1.1 needs a Host");
        let old = Request::get("/")
            .version(hyper::Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(request_host(&old), Ok(None), "HTTP/1.0 may have none");
        let two = Request::get("/")
            .header(header::HOST, "a")
            .header(header::HOST, "b")
            .body(())
            .unwrap();
        assert!(request_host(&two).unwrap_err().contains("not two"));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
    }
}
