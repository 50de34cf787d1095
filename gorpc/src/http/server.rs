//! The server side: telling the protocols apart on an accepted connection, and the mapping
//! from HTTP requests (parsed and framed by hyper) to the same [`ServerRequest`]s the binary
//! driver builds, answered by the same [`Service`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::FutureExt;
use gorpc_proto::{Code, ConnConfig, Limits, RequestHead, Status};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, HOST, TRANSFER_ENCODING,
};
use http::{Method, Request, Response, StatusCode, Version};
use tracing::Instrument as _;

use super::body::{read_body, BodyBudget, BodyError, BodyHold, EdgeBody};
use super::rt::{HyperIo, HyperTimer};
use super::transcode::{self, Descriptors};
use super::{
    http_status, is_header_value, is_token, put_percent_encoded, ContentType,
    ACCEPTED_CONTENT_TYPES, AUTHORIZATION_METADATA, MESSAGE_HEADER, METADATA_PREFIX, STATUS_HEADER,
    TIMEOUT_HEADER,
};
use crate::io::Timer;
use crate::metadata::Metadata;
use crate::observe::{answered, CallEnd, WatchGuard};
use crate::runtime::{Io, PeerCertificates, Runtime};
use crate::server::conn::{ServerConnection, Signals};
use crate::server::idle::{CallCount, IdleSlot, InFlight};
use crate::server::stop::SignalRx;
use crate::server::Served;
use crate::service::{ServerReply, ServerRequest};

/// How long a new connection may stay silent before it is handed to the binary protocol,
/// whose clients may keep a connection open without a call; HTTP clients speak first.
const SNIFF_WAIT: Duration = Duration::from_secs(10);
/// What every HTTP/2 connection opens with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP settings of a server ([`crate::ServerConfig::http`]).
#[derive(Clone, Copy, Debug)]
pub struct HttpConfig {
    /// The whole head of a request must arrive within this, counted from when the
    /// connection starts waiting for it (so it also closes a kept-alive connection idle that
    /// long). A client dripping its headers a byte at a time is cut off here.
    pub head_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_idle_timeout: Duration,
    /// Request-body bytes all HTTP connections together may hold (bodies being read and
    /// those of running calls). A request that would go over it gets 503.
    pub max_body_bytes_held: usize,
    /// Gzip gRPC answers for clients that accept it (`grpc-accept-encoding: gzip`). Off by
    /// default: compression costs more CPU than it saves bytes on fast links.
    #[cfg(feature = "grpc")]
    pub compress_grpc_responses: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            head_timeout: Duration::from_secs(30),
            body_idle_timeout: Duration::from_secs(60),
            max_body_bytes_held: 128 * 1024 * 1024,
            #[cfg(feature = "grpc")]
            compress_grpc_responses: false,
        }
    }
}

/// A GET endpoint beside the RPC routes ([`crate::Server::get`]): `/healthz`, `/metrics`.
pub type GetHandler =
    Arc<dyn Fn(Request<()>) -> BoxFuture<'static, Response<Bytes>> + Send + Sync + 'static>;

/// The path of the health endpoint every HTTP server answers.
pub(crate) const HEALTH_PATH: &str = "/healthz";

/// State shared by one server's HTTP connections.
pub(crate) struct HttpShared {
    pub(crate) descriptors: Descriptors,
    endpoints: HashMap<String, GetHandler>,
    pub(crate) budget: Arc<BodyBudget>,
    pub(crate) config: HttpConfig,
}

impl std::fmt::Debug for HttpShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpShared")
            .field("endpoints", &self.endpoints.keys())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HttpShared {
    pub(crate) fn new(config: HttpConfig, endpoints: HashMap<String, GetHandler>) -> Self {
        HttpShared {
            descriptors: Descriptors::default(),
            endpoints,
            budget: Arc::new(BodyBudget::new(config.max_body_bytes_held)),
            config,
        }
    }
}

/// A connection the accept loop took, with what serving it needs.
pub(crate) struct Accepted<R: Runtime, I: Io> {
    pub(crate) runtime: R,
    /// The socket, or a TLS session over it whose handshake is done.
    pub(crate) io: I,
    pub(crate) peer: SocketAddr,
    pub(crate) config: ConnConfig,
    pub(crate) served: Arc<Served>,
    pub(crate) signals: Signals,
    /// Set when the server is at its connection limit: the peer is told so, in its own
    /// protocol, and the connection closed.
    pub(crate) refusal: Option<Status>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Binary,
    Http1,
    Http2,
}

/// Which protocol a connection that opened with `bytes` speaks; `None` until it can tell.
fn sniff(bytes: &[u8]) -> Option<Protocol> {
    let prefix = bytes.len().min(H2_PREFACE.len());
    match bytes {
        [] | [b'G'] => None, // "GR…" (a frame) or "GET"
        [b'G', b'R', ..] => Some(Protocol::Binary),
        _ if bytes[..prefix] == H2_PREFACE[..prefix] => {
            (bytes.len() >= H2_PREFACE.len()).then_some(Protocol::Http2)
        }
        [first, ..] if first.is_ascii_uppercase() => Some(Protocol::Http1),
        // Neither: the binary driver reports the bad magic in a go-away.
        _ => Some(Protocol::Binary),
    }
}

/// Serves one accepted connection in whichever protocol it speaks, to its end. The bytes
/// read to tell the protocols apart go to whichever takes the connection.
pub(crate) async fn serve_sniffed<R: Runtime, I: Io>(
    accepted: Accepted<R, I>,
    shared: Arc<HttpShared>,
) {
    let Accepted {
        runtime,
        mut io,
        peer,
        config,
        served,
        signals,
        refusal,
    } = accepted;
    let mut first_bytes = BytesMut::new();
    let mut drain = SignalRx::new(&signals.drain);
    let mut abort = SignalRx::new(&signals.abort);
    let mut silence = runtime.sleep_until(Instant::now() + SNIFF_WAIT);
    // Under TLS the handshake may have chosen already.
    let chosen = match io.alpn_protocol() {
        Some(b"h2") => Some(Protocol::Http2),
        Some(b"http/1.1" | b"http/1.0") => Some(Protocol::Http1),
        _ => None,
    };
    let protocol = poll_fn(|cx| loop {
        if let Some(protocol) = chosen {
            return Poll::Ready(Some(protocol));
        }
        if abort.poll_given(cx) {
            return Poll::Ready(None);
        }
        if let Some(protocol) = sniff(&first_bytes) {
            return Poll::Ready(Some(protocol));
        }
        // A silent peer at a drain (or for long), or one asked to make room for a new
        // connection, is taken for a binary client: its driver then says go-away or pings,
        // as it would have without HTTP.
        if drain.poll_given(cx)
            || signals.idle.poll_evicted(cx)
            || Pin::new(&mut silence).poll(cx).is_ready()
        {
            return Poll::Ready(Some(Protocol::Binary));
        }
        if first_bytes.capacity() - first_bytes.len() < 1024 {
            first_bytes.reserve(4096);
        }
        let room = first_bytes.capacity() - first_bytes.len();
        match io.poll_read_buf(cx, &mut first_bytes, room) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(None),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    let peer_certificates = io.peer_certificates();
    let edge = |protocol| Edge {
        runtime: runtime.clone(),
        shared: shared.clone(),
        served: served.clone(),
        peer,
        peer_certificates: peer_certificates.clone(),
        limits: config.limits,
        stream_window: config.stream_window as usize,
        refusal: refusal.clone(),
        serving: signals.serving.clone(),
        protocol,
        calls: Default::default(),
        // hyper runs the calls: they count themselves, so that the connection is idle (to
        // be closed at the idle timeout, or to make room at the limit) only with none in
        // flight.
        in_flight: CallCount::new(signals.idle.clone()),
    };
    let idle_watch = || IdleWatch::<R> {
        slot: signals.idle.clone(),
        timeout: signals.idle_timeout,
        timer: Timer::new(&runtime),
        told_to_go: None,
    };
    match protocol {
        None => {}
        Some(Protocol::Binary) => {
            let mut conn = ServerConnection::new(runtime, io, peer, config, served, signals);
            match refusal {
                Some(status) => conn.refuse(status),
                None => conn.feed_read(first_bytes),
            }
            conn.await;
        }
        #[cfg(feature = "grpc")]
        Some(Protocol::Http2) => {
            let edge = Arc::new(edge(Protocol::Http2));
            let mut idle = idle_watch();
            let mut builder =
                hyper::server::conn::http2::Builder::new(super::rt::HyperExecutor(runtime.clone()));
            builder
                .timer(HyperTimer(runtime.clone()))
                .initial_stream_window_size(config.stream_window)
                .initial_connection_window_size(config.connection_window)
                .max_concurrent_streams(config.limits.max_concurrent_calls)
                .max_header_list_size(config.limits.max_head_len)
                .keep_alive_interval(config.keepalive.interval)
                .keep_alive_timeout(config.keepalive.timeout);
            let io = HyperIo::new(io, first_bytes);
            let conn = builder.serve_connection(io, HyperService(edge));
            let mut conn = std::pin::pin!(conn);
            let mut draining = false;
            poll_fn(|cx| {
                // Aborting the server drops the connection and its calls wherever they are.
                if abort.poll_given(cx) {
                    return Poll::Ready(());
                }
                if !draining && (drain.poll_given(cx) || idle.poll_should_go(cx)) {
                    // GOAWAY: calls under way finish, no new ones start.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                if idle.poll_overstayed(cx) {
                    return Poll::Ready(());
                }
                conn.as_mut().poll(cx).map(|result| {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "HTTP/2 connection ended");
                    }
                })
            })
            .await;
        }
        // HTTP/2 without the `grpc` feature goes to HTTP/1.1, which refuses it.
        #[allow(unreachable_patterns)]
        Some(Protocol::Http1 | Protocol::Http2) => {
            let edge = Arc::new(edge(Protocol::Http1));
            let mut idle = idle_watch();
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(HyperTimer(runtime.clone()))
                .header_read_timeout(shared.config.head_timeout)
                // hyper's default cap on request headers (100; more is 431) parses them
                // into an array on the stack: a cap of our own would be a heap vector
                // initialised for every request.
                .max_header_size(config.limits.max_head_len as usize)
                .max_buf_size((config.limits.max_head_len as usize).max(8192) * 2);
            let io = HyperIo::new(io, first_bytes);
            let mut conn = builder.serve_connection(io, HyperService(edge));
            let mut draining = false;
            let ended = poll_fn(|cx| {
                // Aborting the server drops the connection wherever it is.
                if abort.poll_given(cx) {
                    return Poll::Ready(false);
                }
                if !draining && (drain.poll_given(cx) || idle.poll_should_go(cx)) {
                    // The answer under way is the last; an idle connection closes now.
                    draining = true;
                    Pin::new(&mut conn).graceful_shutdown();
                }
                if idle.poll_overstayed(cx) {
                    return Poll::Ready(false);
                }
                conn.poll_without_shutdown(cx).map(|result| {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "HTTP/1.1 connection ended");
                    }
                    true
                })
            })
            .await;
            if ended {
                let io = conn.into_parts().io.into_inner();
                linger(&runtime, io, &mut abort).await;
            }
        }
    }
}

/// After refusing a request, how long the server reads and discards what the client still
/// sends before closing: closing with unread bytes would reset the connection, and the
/// client could lose the answer.
const LINGER: Duration = Duration::from_secs(2);

/// Closes a connection hyper is done with: the write side at once, the read side once the
/// client closes too, or after discarding what it still sends for [`LINGER`].
async fn linger<R: Runtime, I: Io>(runtime: &R, mut io: I, abort: &mut SignalRx) {
    let _ = poll_fn(|cx| io.poll_shutdown(cx)).await;
    let mut timer = runtime.sleep_until(Instant::now() + LINGER);
    let mut buf = BytesMut::new();
    poll_fn(|cx| loop {
        if abort.poll_given(cx) {
            return Poll::Ready(());
        }
        buf.clear();
        if buf.capacity() == 0 {
            buf.reserve(4096);
        }
        match io.poll_read_buf(cx, &mut buf, 4096) {
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => {
                return match Pin::new(&mut timer).poll(cx) {
                    Poll::Ready(()) => Poll::Ready(()),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    })
    .await;
}

/// One connection's way into the service, as hyper calls it for each request.
pub(crate) struct Edge<R> {
    pub(crate) runtime: R,
    pub(crate) shared: Arc<HttpShared>,
    pub(crate) served: Arc<Served>,
    pub(crate) peer: SocketAddr,
    pub(crate) peer_certificates: Option<PeerCertificates>,
    pub(crate) limits: Limits,
    /// Request bytes a stream call's handler may leave untaken before the client is held.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) stream_window: usize,
    /// Set when the server is at its connection limit: every request is refused with it.
    pub(crate) refusal: Option<Status>,
    /// What `/healthz` reports.
    serving: Arc<crate::server::Serving>,
    protocol: Protocol,
    /// The last call id given out on this connection (gRPC calls have ids for their
    /// stream halves, as binary ones do).
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    calls: std::sync::atomic::AtomicU32,
    /// The connection's calls in flight.
    in_flight: Arc<CallCount>,
}

impl<R> Edge<R> {
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn next_call_id(&self) -> gorpc_proto::CallId {
        let id = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        gorpc_proto::CallId::from(id.wrapping_add(1))
    }
}

/// hyper's view of an [`Edge`].
struct HyperService<R>(Arc<Edge<R>>);

impl<R: Runtime> hyper::service::Service<Request<hyper::body::Incoming>> for HyperService<R> {
    type Response = Response<EdgeBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<EdgeBody>, Infallible>>;

    fn call(&self, request: Request<hyper::body::Incoming>) -> Self::Future {
        let edge = self.0.clone();
        let in_flight = edge.in_flight.begin();
        #[cfg(feature = "grpc")]
        if edge.protocol == Protocol::Http2 {
            let grpc = request
                .headers()
                .get(CONTENT_TYPE)
                .map(|value| crate::grpc::headers::content_codec(value.as_bytes()));
            match grpc {
                Some(Ok(Some(codec))) => {
                    return Box::pin(async move {
                        let mut response = crate::grpc::server::serve(&edge, request, codec).await;
                        count_until_sent(&mut response, in_flight);
                        Ok(response)
                    });
                }
                Some(Err(message)) => {
                    let status = Status::new(Code::Unimplemented, message);
                    return Box::pin(std::future::ready(Ok(crate::grpc::server::refuse(&status))));
                }
                // Not gRPC: HTTP requests over HTTP/2 are served as over HTTP/1.1.
                Some(Ok(None)) | None => {}
            }
        }
        // Its own future, apart from gRPC's larger one: it is moved into its box whole.
        Box::pin(async move {
            let mut response = edge.serve_http(request).await;
            count_until_sent(&mut response, in_flight);
            Ok(response)
        })
    }
}

/// A call counts as in flight until its answer is out: an answer held whole is, once
/// hyper has it; a stream's body carries the count until it ends.
fn count_until_sent(response: &mut Response<EdgeBody>, in_flight: InFlight) {
    let body = response.body_mut();
    if matches!(body, EdgeBody::Stream(_)) {
        if let EdgeBody::Stream(body_stream) = std::mem::replace(body, EdgeBody::Full(None)) {
            *body = EdgeBody::Stream(Box::pin(CountedBody {
                body: body_stream,
                _in_flight: in_flight,
            }));
        }
    }
}

/// A stream call's response body, counted as a call in flight while it lives.
struct CountedBody {
    body: Pin<Box<dyn http_body::Body<Data = Bytes, Error = Status> + Send>>,
    _in_flight: InFlight,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        self.get_mut().body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How long an HTTP connection told to go for idleness may take to close. HTTP/2's graceful
/// close waits for the client to answer a ping, which a client that only holds connections
/// open never does.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// When an HTTP connection should go, as the binary driver decides for its own: the server
/// asked it to make room for a new one, or it has had no call in flight for the server's
/// idle timeout.
struct IdleWatch<R: Runtime> {
    slot: Arc<IdleSlot>,
    timeout: Option<Duration>,
    timer: Timer<R>,
    told_to_go: Option<Instant>,
}

impl<R: Runtime> IdleWatch<R> {
    /// Whether the connection should go now; from then on it has [`IDLE_CLOSE_GRACE`].
    fn poll_should_go(&mut self, cx: &mut Context<'_>) -> bool {
        let now = Instant::now();
        let go = self.slot.poll_evicted(cx)
            || self.timeout.is_some_and(|limit| {
                // A call's end does not wake the connection: while busy, look again a
                // whole timeout later, when it has been idle for at most that long.
                let since = self.slot.idle_since().unwrap_or(now);
                self.timer.poll(cx, since.checked_add(limit), now)
            });
        if go {
            self.told_to_go = Some(now);
        }
        go
    }

    /// Whether a connection told to go is still open past its grace: it is closed then.
    fn poll_overstayed(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(told) = self.told_to_go else {
            return false;
        };
        self.timer
            .poll(cx, told.checked_add(IDLE_CLOSE_GRACE), Instant::now())
    }
}

/// A request refused before its call: the HTTP status, the call status, and whether the
/// connection must close after the answer (the request could not be framed).
struct Refusal {
    http: StatusCode,
    status: Status,
    close: bool,
    allow: Option<&'static str>,
}

impl Refusal {
    fn new(
        http: StatusCode,
        code: Code,
        message: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Self {
        Refusal {
            http,
            status: Status::new(code, message),
            close: false,
            allow: None,
        }
    }

    fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    fn allowing(mut self, methods: &'static str) -> Self {
        self.allow = Some(methods);
        self
    }

    fn into_response(self) -> Response<EdgeBody> {
        let mut response = error_response(self.http, &self.status);
        let headers = response.headers_mut();
        if let Some(methods) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(methods));
        }
        if self.close {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl<R: Runtime> Edge<R> {
    async fn serve_http(&self, request: Request<hyper::body::Incoming>) -> Response<EdgeBody> {
        match self.serve_http_or_refuse(request).await {
            Ok(response) => response,
            Err(refusal) => {
                tracing::debug!(peer = %self.peer, status = %refusal.status, "HTTP request refused");
                refusal.into_response()
            }
        }
    }

    async fn serve_http_or_refuse(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response<EdgeBody>, Refusal> {
        if let Some(status) = &self.refusal {
            let http = StatusCode::from_u16(http_status(status.code()))
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err(Refusal {
                http,
                status: status.clone(),
                close: true,
                allow: None,
            });
        }
        // RFC 9112 3.2: an HTTP/1.1 request has exactly one Host.
        let hosts = request.headers().get_all(HOST).iter().count();
        if request.version() == Version::HTTP_11 && hosts != 1 {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                if hosts == 0 {
                    "an HTTP/1.1 request needs a Host header"
                } else {
                    "more than one Host header"
                },
            )
            .closing());
        }
        let path = request.uri().path();
        if let Some(endpoint) = self.shared.endpoints.get(path) {
            if request.method() != Method::GET && request.method() != Method::HEAD {
                return Err(Refusal::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    Code::Unimplemented,
                    format!("{path} answers GET and HEAD"),
                )
                .allowing("GET, HEAD"));
            }
            let (parts, _body) = request.into_parts();
            let response = endpoint(Request::from_parts(parts, ())).await;
            return Ok(response.map(EdgeBody::full));
        }
        if path == HEALTH_PATH && !self.shared.endpoints.contains_key(HEALTH_PATH) {
            return self.health(request.method());
        }
        if request.method() != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                format!(
                    "HTTP method {} is not served here: call methods with POST",
                    request.method()
                ),
            )
            .allowing("POST"));
        }
        self.call_http(request).await
    }

    /// `/healthz`: 200 while serving, 503 once the server is not (it shuts down, or was
    /// told so).
    fn health(&self, method: &Method) -> Result<Response<EdgeBody>, Refusal> {
        if method != Method::GET && method != Method::HEAD {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                format!("{HEALTH_PATH} answers GET and HEAD"),
            )
            .allowing("GET, HEAD"));
        }
        let (http, text) = if self.serving.is_serving() {
            (StatusCode::OK, "serving\n")
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not serving\n")
        };
        let mut response = Response::new(EdgeBody::full(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = http;
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        Ok(response)
    }

    /// A unary call over HTTP (1.1, or 2 without gRPC): `POST /package.Service/Method`.
    async fn call_http(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response<EdgeBody>, Refusal> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        // hyper frames any coding list that ends in chunked as chunked, and would hand over
        // a body still gzipped: only `chunked` alone is served, once.
        let mut codings = parts.headers.get_all(TRANSFER_ENCODING).iter();
        if let Some(coding) = codings.next() {
            if codings.next().is_some()
                || !coding
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked")
            {
                let named = String::from_utf8_lossy(coding.as_bytes()).into_owned();
                return Err(Refusal::new(
                    StatusCode::NOT_IMPLEMENTED,
                    Code::Unimplemented,
                    format!(
                        "Transfer-Encoding {named:?} is not supported: send the body chunked or \
                         with Content-Length"
                    ),
                )
                .closing());
            }
        }
        // Problems that leave the framing intact are answered once the body is read, so
        // the connection goes on.
        let mut problem = None;
        if !path.starts_with('/') || path.len() < 2 {
            problem = Some(Refusal::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                format!(
                    "request target {:?} is not a method path (/package.Service/Method)",
                    parts.uri
                ),
            ));
        }
        let content_type = match parts.headers.get(CONTENT_TYPE) {
            Some(value) => ContentType::parse(value.as_bytes()).ok_or_else(|| {
                let named = String::from_utf8_lossy(value.as_bytes());
                format!("Content-Type {named:?} is not served; accepted: {ACCEPTED_CONTENT_TYPES}")
            }),
            None => Err(format!(
                "Content-Type missing; accepted: {ACCEPTED_CONTENT_TYPES}"
            )),
        };
        let content_type = match content_type {
            Ok(content_type) => Some(content_type),
            Err(message) => {
                problem = problem.or(Some(Refusal::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    Code::InvalidArgument,
                    message,
                )));
                None
            }
        };
        let timeout = match parts.headers.get(TIMEOUT_HEADER).map(parse_millis) {
            None => None,
            Some(Some(timeout)) => Some(timeout),
            Some(None) => {
                problem = problem.or(Some(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidArgument,
                    format!("{TIMEOUT_HEADER} must be a whole number of milliseconds"),
                )));
                None
            }
        };
        if let Some(kind) = self.served.service.stream_kind(path) {
            problem = problem.or(Some(Refusal::new(
                StatusCode::NOT_IMPLEMENTED,
                Code::Unimplemented,
                format!(
                    "{path} is a {} method: HTTP/1.1 carries unary calls only; call it over \
                     gRPC (HTTP/2) or the binary protocol",
                    describe(kind)
                ),
            )));
        }

        let mut hold = BodyHold::new(&self.shared.budget);
        let max = self.limits.max_frame_len as usize;
        let body = read_body(
            &self.runtime,
            body,
            max,
            Some(&mut hold),
            self.shared.config.body_idle_timeout,
        )
        .await
        .map_err(|e| body_refusal(e, max))?;
        if let Some(problem) = problem {
            return Err(problem);
        }
        let content_type = content_type.unwrap_or(ContentType::OctetStream);

        let metadata = http_metadata(&parts.headers);
        let head = request_head(path, timeout, metadata).ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                Code::InvalidArgument,
                "request target is not a method path",
            )
        })?;
        let schema = match content_type {
            ContentType::Json => self.served.service.schema(head.method()),
            _ => None,
        };
        let (codec, body) = match &schema {
            Some(schema) => {
                match transcode::json_to_native(&self.shared.descriptors, schema, &body) {
                    Ok(native) => (schema.codec(), native),
                    Err(status) => return Err(refusal_for(status)),
                }
            }
            None => (content_type.codec(), body),
        };
        let now = Instant::now();
        let deadline = timeout.and_then(|t| now.checked_add(t));
        // Only closing the connection stops an HTTP/1.1 request; HTTP/2 resets the stream.
        let if_dropped = match self.protocol {
            Protocol::Http2 => CallEnd::Cancelled,
            _ => CallEnd::ConnectionLost,
        };
        let mut watch = self.watch(&head, now, if_dropped);
        watch.request_bytes(body.len());
        let request = ServerRequest {
            head,
            edited: None,
            codec,
            body,
            deadline,
            peer: Some(self.peer),
            peer_certificates: self.peer_certificates.clone(),
            streams: Default::default(),
        };
        let reply = call_within(&self.runtime, &self.served, request, deadline, &mut watch).await;
        drop(hold);
        let body = match &schema {
            Some(schema) if reply.status.is_ok() => {
                transcode::native_to_json(&self.shared.descriptors, schema, &reply.body)
            }
            _ => Ok(reply.body),
        };
        let status = match &body {
            Ok(_) => &reply.status,
            Err(status) => status,
        };
        watch.end(answered(status), Some(status));
        if !reply.status.is_ok() {
            return Err(refusal_for(reply.status));
        }
        let body = body.map_err(refusal_for)?;
        watch.response_bytes(body.len());
        let mut response = Response::new(EdgeBody::full(body));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(content_type.as_str()),
        );
        put_status(headers, &reply.status);
        put_metadata(headers, &reply.metadata);
        Ok(response)
    }
}

fn describe(kind: gorpc_proto::StreamKind) -> &'static str {
    match kind {
        gorpc_proto::StreamKind::ServerStreaming => "server-streaming",
        gorpc_proto::StreamKind::ClientStreaming => "client-streaming",
        gorpc_proto::StreamKind::Bidirectional => "bidirectional",
    }
}

/// Whole milliseconds, as [`TIMEOUT_HEADER`] carries them.
fn parse_millis(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u64>().ok().map(Duration::from_millis)
}

/// The metadata an HTTP request carries: its `x-gorpc-md-*` headers, and
/// `Authorization` as `authorization`. Header names are lowercase already.
fn http_metadata(headers: &HeaderMap) -> impl Iterator<Item = (&str, &[u8])> {
    headers.iter().filter_map(|(name, value)| {
        let name = name.as_str();
        let key = match name.strip_prefix(METADATA_PREFIX) {
            Some(key) if !key.is_empty() => key,
            _ if name == AUTHORIZATION_METADATA => name,
            _ => return None,
        };
        Some((key, value.as_bytes()))
    })
}

/// A request's head as the binary protocol's, so handlers and interceptors see the same
/// `ServerRequest` from every protocol. `None` if `path` cannot be a method path.
pub(crate) fn request_head<'m>(
    path: &str,
    timeout: Option<Duration>,
    metadata: impl Iterator<Item = (&'m str, &'m [u8])>,
) -> Option<RequestHead> {
    let timeout_micros = timeout.map_or(0, |t| u64::try_from(t.as_micros()).unwrap_or(u64::MAX));
    let mut raw = BytesMut::new();
    gorpc_proto::head::encode_request_head(path, timeout_micros, metadata, &mut raw);
    RequestHead::decode(raw.freeze()).ok()
}

impl<R> Edge<R> {
    /// Starts watching a call that arrived at `now`; dropped unended, it ends `if_dropped`.
    pub(crate) fn watch(
        &self,
        head: &RequestHead,
        now: Instant,
        if_dropped: CallEnd,
    ) -> WatchGuard {
        let watch = self
            .served
            .watch(head, head.method(), None, self.peer, None, now);
        WatchGuard::new(self.served.observer.clone(), watch, if_dropped)
    }
}

/// Runs the service (and its interceptors) in the call's span until it answers or
/// `deadline` passes. A panic is an `Internal` answer, as on the binary protocol; at the
/// deadline the handler is dropped, the answer is `DeadlineExceeded` and the call ends so.
pub(crate) async fn call_within<R: Runtime>(
    runtime: &R,
    served: &Served,
    request: ServerRequest,
    deadline: Option<Instant>,
    watch: &mut WatchGuard,
) -> ServerReply {
    let panicked = || ServerReply::error(Status::new(Code::Internal, "handler panicked"));
    let span = watch.span();
    let call = || span.in_scope(|| served.service.call(request));
    let future = match std::panic::catch_unwind(AssertUnwindSafe(call)) {
        Ok(future) => future,
        Err(_) => return panicked(),
    };
    let mut future = AssertUnwindSafe(future).catch_unwind().instrument(span);
    // Armed only if the handler has to wait: an inline answer costs no timer.
    let mut timer: Option<R::Sleep> = None;
    poll_fn(|cx| {
        if let Poll::Ready(result) = future.poll_unpin(cx) {
            return Poll::Ready(result.unwrap_or_else(|_| panicked()));
        }
        let Some(deadline) = deadline else {
            return Poll::Pending;
        };
        let timer = timer.get_or_insert_with(|| runtime.sleep_until(deadline));
        if Pin::new(timer).poll(cx).is_ready() {
            let status = Status::new(
                Code::DeadlineExceeded,
                "deadline exceeded before the handler answered",
            );
            watch.end(CallEnd::DeadlineExceeded, Some(&status));
            return Poll::Ready(ServerReply::error(status));
        }
        Poll::Pending
    })
    .await
}

/// The refusal of a request whose body could not be read.
fn body_refusal(error: BodyError, max: usize) -> Refusal {
    match error {
        BodyError::TooLarge => Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::ResourceExhausted,
            format!("request body over the server's limit of {max} bytes"),
        )
        .closing(),
        BodyError::OverBudget => Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "the server holds too many request bodies; try again later",
        )
        .closing(),
        BodyError::Trailers => Refusal::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidArgument,
            "trailer fields after a chunked request body are not accepted",
        )
        .closing(),
        BodyError::Stalled => Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            Code::DeadlineExceeded,
            "the request body stopped arriving",
        )
        .closing(),
        BodyError::Broken(error) => Refusal::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidArgument,
            format!("malformed request body: {}", error_chain(&error)),
        )
        .closing(),
    }
}

/// An error and its causes, as hyper's own messages say little ("error reading a body")
/// and their sources say what was wrong ("invalid chunk size line").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The answer to a call that ended with `status`, not OK.
fn refusal_for(status: Status) -> Refusal {
    let http = StatusCode::from_u16(http_status(status.code()))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Refusal {
        http,
        status,
        close: false,
        allow: None,
    }
}

/// An error answer: the status in headers, its message also as a plain-text body for people
/// reading `curl` output.
fn error_response(http: StatusCode, status: &Status) -> Response<EdgeBody> {
    let mut text = String::with_capacity(status.message().len() + 1);
    text.push_str(status.message());
    text.push('\n');
    let mut response = Response::new(EdgeBody::full(Bytes::from(text)));
    *response.status_mut() = http;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    put_status(headers, status);
    response
}

/// `x-gorpc-status` and `x-gorpc-message`: names and the usual values are static, so an
/// answer allocates nothing for them.
fn put_status(headers: &mut HeaderMap, status: &Status) {
    // Checked once, at compile time, rather than with every answer.
    const STATUS_NAME: HeaderName = HeaderName::from_static(STATUS_HEADER);
    const MESSAGE_NAME: HeaderName = HeaderName::from_static(MESSAGE_HEADER);
    #[rustfmt::skip]
    const CODES: [HeaderValue; 17] = {
        const fn v(code: &'static str) -> HeaderValue {
            HeaderValue::from_static(code)
        }
        [
            v("0"), v("1"), v("2"), v("3"), v("4"), v("5"), v("6"), v("7"), v("8"), v("9"),
            v("10"), v("11"), v("12"), v("13"), v("14"), v("15"), v("16"),
        ]
    };
    let code = CODES
        .get(status.code() as usize)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from(status.code() as u32));
    headers.insert(STATUS_NAME, code);
    let message = if status.message().is_empty() {
        const EMPTY: HeaderValue = HeaderValue::from_static("");
        EMPTY
    } else {
        let mut message = BytesMut::new();
        put_percent_encoded(&mut message, status.message());
        // Percent-encoding leaves printable ASCII only.
        match HeaderValue::from_maybe_shared(message.freeze()) {
            Ok(value) => value,
            Err(_) => return,
        }
    };
    headers.insert(MESSAGE_NAME, message);
}

/// Response metadata as `x-gorpc-md-*` headers; entries no header can carry are left out.
fn put_metadata(headers: &mut HeaderMap, metadata: &Metadata) {
    for (key, value) in metadata.iter() {
        let name = format!("{METADATA_PREFIX}{key}");
        let header = (is_token(key.as_bytes()) && is_header_value(value))
            .then(|| {
                let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
                let value = HeaderValue::from_bytes(value).ok()?;
                Some((name, value))
            })
            .flatten();
        match header {
            Some((name, value)) => {
                headers.append(name, value);
            }
            None => tracing::warn!(
                key,
                "response metadata cannot travel as an HTTP header; left out"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_tells_frames_from_requests() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"G"), None);
        assert_eq!(sniff(b"GR\x01"), Some(Protocol::Binary));
        assert_eq!(sniff(b"GE"), Some(Protocol::Http1));
        assert_eq!(sniff(b"POST /"), Some(Protocol::Http1));
        assert_eq!(sniff(b"P"), None, "POST or the HTTP/2 preface");
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(sniff(b"\x00\x01"), Some(Protocol::Binary));
    }

    #[test]
    fn metadata_comes_from_prefixed_headers_and_authorization() {
        let mut headers = HeaderMap::new();
        headers.insert("x-gorpc-md-trace-id", HeaderValue::from_static("abc"));
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert("x-gorpc-md-", HeaderValue::from_static("no key"));
        headers.insert("x-other", HeaderValue::from_static("ignored"));
        let mut found: Vec<_> = http_metadata(&headers).collect();
        found.sort();
        assert_eq!(
            found,
            [
                ("authorization", &b"Bearer t"[..]),
                ("trace-id", &b"abc"[..])
            ]
        );
    }

    #[test]
    fn timeouts_are_whole_milliseconds() {
        let parse = |v: &'static str| parse_millis(&HeaderValue::from_static(v));
        assert_eq!(parse("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse(" 7 "), Some(Duration::from_millis(7)));
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("1.5"), None);
        assert_eq!(parse(""), None);
        assert_eq!(parse("99999999999999999999999"), None);
    }
}
