//! The client side: calls to any gRPC server over one HTTP/2 connection (hyper's client,
//! over the runtime adapter), unary and stream calls alike.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Shared};
use futures::task::AtomicWaker;
use futures::FutureExt as _;
use gorpc_proto::{CallId, Code, Status, StreamKind};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, TE, USER_AGENT};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2::SendRequest;

use super::headers::{self, GRPC_ACCEPT_ENCODING, GRPC_ENCODING, GRPC_TIMEOUT};
use super::message::{self, Decoder, Encoding, ACCEPT_ENCODING};
use crate::client::{
    Channel, Client, ClientConfig, ConnectionConfig, OutgoingCall, RawResponse, RawStreamReceiver,
    RawStreamSender, StreamAnswer, StreamDriver, StreamEnd, StreamHalves,
};
use crate::http::body::EdgeBody;
use crate::http::rt::{HyperExecutor, HyperIo, HyperTimer};
use crate::http::HttpTarget;
use crate::metadata::Metadata;
use crate::runtime::{timeout, Io, Runtime};
use crate::stream::handoff::{Framing, Inbox, InboxReader, Outbox, StreamControl};

/// What a gorpc client says it is.
const USER_AGENT_VALUE: &str = concat!("gorpc-rs/", env!("CARGO_PKG_VERSION"));

/// Calls a gRPC server (any: tonic, grpc-go, grpcio, gorpc) over HTTP/2: every call of the
/// channel shares one connection, made on first use and again after it fails. TLS (with
/// ALPN `h2`) when the connection config carries it. Put it behind
/// [`Client::from_channel`], or use [`Client::grpc`].
pub struct GrpcChannel<R: Runtime> {
    inner: Arc<Inner<R>>,
}

impl<R: Runtime> Clone for GrpcChannel<R> {
    fn clone(&self) -> Self {
        GrpcChannel {
            inner: self.inner.clone(),
        }
    }
}

impl<R: Runtime> std::fmt::Debug for GrpcChannel<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

type Connecting = Shared<BoxFuture<'static, Result<SendRequest<EdgeBody>, Status>>>;

enum State {
    Idle,
    Connecting(Connecting),
    Ready(SendRequest<EdgeBody>),
}

struct Inner<R: Runtime> {
    runtime: R,
    target: HttpTarget,
    /// `scheme://authority` of every request's URI.
    origin: String,
    config: ConnectionConfig,
    state: Mutex<State>,
    /// Ids for stream calls' halves.
    calls: AtomicU32,
}

impl<R: Runtime> GrpcChannel<R> {
    /// A channel to `target`, with the connect timeout, limits, keepalive, stream windows
    /// and TLS of `config`.
    pub fn new(runtime: R, target: impl Into<HttpTarget>, config: ConnectionConfig) -> Self {
        let target = target.into();
        let scheme = if has_tls(&config) { "https" } else { "http" };
        let origin = format!("{scheme}://{target}");
        GrpcChannel {
            inner: Arc::new(Inner {
                runtime,
                target,
                origin,
                config,
                state: Mutex::new(State::Idle),
                calls: AtomicU32::new(0),
            }),
        }
    }

    /// Sends `call`; a call whose request never left (no connection could be had) comes
    /// back with the reason, so that it can go to another endpoint.
    pub(crate) async fn send_on(
        &self,
        call: OutgoingCall,
    ) -> Result<Result<RawResponse, Status>, (Status, OutgoingCall)> {
        let inner = &self.inner;
        let request = match inner.request(&call, EdgeBody::Frames(one_message(&call.body))) {
            Ok(request) => request,
            Err(status) => return Ok(Err(status)),
        };
        let mut sender = match inner.sender(call.deadline).await {
            Ok(sender) => sender,
            Err(status) => return Err((status, call)),
        };
        let exchange = async {
            let response = sender.send_request(request).await.map_err(request_failed)?;
            inner.read_unary(response).await
        };
        Ok(match call.deadline {
            None => exchange.await,
            // Dropping the exchange resets the stream: the server drops the handler.
            Some(deadline) => timeout(&inner.runtime, deadline, exchange)
                .await
                .unwrap_or_else(|| Err(deadline_exceeded()))
                .map_err(|status| after_deadline(status, Some(deadline))),
        })
    }

    /// Starts a stream call; one that could not be started comes back with the reason.
    pub(crate) async fn start_stream_on(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> Result<StreamHalves, (Status, OutgoingCall)> {
        let inner = &self.inner;
        let id = CallId::from(inner.calls.fetch_add(1, Ordering::Relaxed).wrapping_add(1));
        let outbox = Arc::new(Outbox::framed(Some(id), Framing::Grpc));
        let inbox = Arc::new(Inbox::<StreamEnd>::default());
        let driver = Arc::new(StreamCall::default());
        let body = if kind.client_streams() {
            EdgeBody::Stream(Box::pin(RequestStream {
                outbox: outbox.clone(),
                driver: driver.clone(),
            }))
        } else {
            EdgeBody::Frames(one_message(&call.body))
        };
        let request = match inner.request(&call, body) {
            Ok(request) => request,
            Err(status) => return Err((status, call)),
        };
        let mut sender = match inner.sender(call.deadline).await {
            Ok(sender) => sender,
            Err(status) => return Err((status, call)),
        };
        let response = sender.send_request(request);
        let pump = ResponsePump {
            inbox: inbox.clone(),
            driver: driver.clone(),
            window: inner.config.conn.stream_window as usize,
            max: inner.config.conn.limits.max_frame_len as usize,
            one_response: !kind.server_streams(),
        };
        let runtime = inner.runtime.clone();
        let deadline = call.deadline;
        let outbox_end = outbox.clone();
        inner.runtime.spawn(async move {
            let end = pump.run(&runtime, response, deadline).await;
            let end = end.map(|end| end.map_err(|status| after_deadline(status, deadline)));
            outbox_end.end();
            if let Some(end) = end {
                pump.inbox.end(end);
            }
        });
        let driver: Arc<dyn StreamDriver> = driver;
        let sender = kind
            .client_streams()
            .then(|| RawStreamSender::new(outbox.clone(), driver.clone()));
        let receiver = RawStreamReceiver::new(InboxReader::new(inbox), outbox, driver);
        Ok((sender, receiver))
    }
}

impl<R: Runtime> Channel for GrpcChannel<R> {
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let channel = self.clone();
        Box::pin(async move {
            channel
                .send_on(call)
                .await
                .unwrap_or_else(|(status, _)| Err(status))
        })
    }

    fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'static, Result<StreamHalves, Status>> {
        let channel = self.clone();
        Box::pin(async move {
            channel
                .start_stream_on(call, kind)
                .await
                .map_err(|(status, _)| status)
        })
    }
}

impl<R: Runtime> crate::client::BoxedCalls for GrpcChannel<R> {
    fn send(
        &self,
        call: OutgoingCall,
    ) -> BoxFuture<'static, Result<Result<RawResponse, Status>, (Status, OutgoingCall)>> {
        let channel = self.clone();
        Box::pin(async move { channel.send_on(call).await })
    }

    fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'static, Result<StreamHalves, (Status, OutgoingCall)>> {
        let channel = self.clone();
        Box::pin(async move { channel.start_stream_on(call, kind).await })
    }
}

impl Client {
    /// A client that calls `target` (an address, or a host name and port) over gRPC: any
    /// gRPC server, with the connect timeout, limits, TLS and default timeout of `config`.
    pub fn grpc<R: Runtime>(
        runtime: R,
        target: impl Into<HttpTarget>,
        config: ClientConfig,
    ) -> Client {
        let channel = GrpcChannel::new(runtime.clone(), target, config.pool.connection.clone());
        Client::of_channel(runtime, channel, &config)
    }
}

#[cfg(feature = "tls")]
fn has_tls(config: &ConnectionConfig) -> bool {
    config.tls.is_some()
}

#[cfg(not(feature = "tls"))]
fn has_tls(_: &ConnectionConfig) -> bool {
    false
}

/// One message framed, as a body's frames.
fn one_message(body: &Bytes) -> VecDeque<Frame<Bytes>> {
    let mut framed = BytesMut::with_capacity(message::PREFIX + body.len());
    message::put_message(&mut framed, false, body);
    VecDeque::from([Frame::data(framed.freeze())])
}

fn request_failed(e: hyper::Error) -> Status {
    Status::new(
        Code::Unavailable,
        format!(
            "gRPC request failed: {}",
            crate::http::server::error_chain(&e)
        ),
    )
}

/// An error that came once the call's deadline had passed is the deadline's doing, however
/// the server put it: the server's timer starts when the request arrives (the timeout is
/// sent rounded up), so it fires after the client's, and tonic's says `CANCELLED`
/// "Timeout expired". As in grpc-go, the deadline decides the code.
fn after_deadline(status: Status, deadline: Option<Instant>) -> Status {
    let passed = deadline.is_some_and(|deadline| Instant::now() >= deadline);
    if !passed || status.code() == Code::DeadlineExceeded || status.code() == Code::Ok {
        return status;
    }
    Status::new(
        Code::DeadlineExceeded,
        format!("deadline exceeded (the server answered {status})"),
    )
}

fn deadline_exceeded() -> Status {
    Status::new(Code::DeadlineExceeded, "deadline exceeded")
}

/// The status gRPC gives an answer that is not gRPC (a proxy's error page, say).
fn http_failure(status: StatusCode) -> Status {
    let code = crate::http::code_for_http_status(status.as_u16());
    Status::new(
        code,
        format!("HTTP status {status} instead of a gRPC answer"),
    )
}

impl<R: Runtime> Inner<R> {
    /// The request of `call` with `body`; fails for what gRPC headers cannot carry.
    fn request(&self, call: &OutgoingCall, body: EdgeBody) -> Result<Request<EdgeBody>, Status> {
        let uri = format!("{}{}", self.origin, call.method);
        let uri = Uri::try_from(uri)
            .ok()
            .filter(|_| call.method.starts_with('/'))
            .ok_or_else(|| {
                Status::new(
                    Code::InvalidArgument,
                    format!("method {:?} is not a path gRPC can carry", call.method),
                )
            })?;
        let mut request = Request::new(body);
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(headers::content_type(call.codec)),
        );
        headers.insert(TE, HeaderValue::from_static("trailers"));
        headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        headers.insert(
            GRPC_ACCEPT_ENCODING,
            HeaderValue::from_static(ACCEPT_ENCODING),
        );
        if let Some(deadline) = call.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(deadline_exceeded());
            }
            headers.insert(GRPC_TIMEOUT, headers::format_timeout(left));
        }
        headers::put_metadata(headers, call.metadata.iter(), false)?;
        Ok(request)
    }

    /// The connection's sender, connecting (once, for all callers) when there is none.
    async fn sender(&self, deadline: Option<Instant>) -> Result<SendRequest<EdgeBody>, Status> {
        for _ in 0..2 {
            let next = {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                match &*state {
                    State::Ready(sender) if !sender.is_closed() => Ok(sender.clone()),
                    State::Connecting(connecting) => Err(connecting.clone()),
                    State::Ready(_) | State::Idle => {
                        let connecting = self.connect().shared();
                        *state = State::Connecting(connecting.clone());
                        Err(connecting)
                    }
                }
            };
            let connecting = match next {
                Ok(mut sender) => {
                    // Ready at once unless the connection is at its stream limit.
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                    continue;
                }
                Err(connecting) => connecting,
            };
            let connected = match deadline {
                None => connecting.clone().await,
                Some(deadline) => timeout(&self.runtime, deadline, connecting.clone())
                    .await
                    .unwrap_or_else(|| Err(deadline_exceeded())),
            };
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // Only the first waiter of this attempt records its outcome.
            if matches!(&*state, State::Connecting(c) if c.ptr_eq(&connecting)) {
                *state = match &connected {
                    Ok(sender) => State::Ready(sender.clone()),
                    Err(_) => State::Idle,
                };
            }
            return connected;
        }
        Err(Status::new(
            Code::Unavailable,
            format!("the connection to {} closed", self.target),
        ))
    }

    /// A new connection: resolve, connect, TLS with ALPN `h2`, the HTTP/2 handshake; its
    /// driver runs on the runtime.
    fn connect(&self) -> BoxFuture<'static, Result<SendRequest<EdgeBody>, Status>> {
        let (runtime, target, config) = (
            self.runtime.clone(),
            self.target.clone(),
            self.config.clone(),
        );
        Box::pin(async move {
            let deadline = Instant::now() + config.connect_timeout;
            let addrs = match timeout(&runtime, deadline, target.resolve()).await {
                Some(addrs) => addrs?,
                None => {
                    return Err(Status::unavailable(format!("resolving {target} timed out"))
                        .with_source(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                }
            };
            let mut failure = None;
            for addr in addrs {
                match connect_to(&runtime, &config, addr, deadline).await {
                    Ok(sender) => return Ok(sender),
                    Err(status) => failure = Some(status),
                }
            }
            Err(failure.unwrap_or_else(|| Status::new(Code::Unavailable, "no address")))
        })
    }

    /// A unary call's answer: its one message, metadata from headers and trailers.
    async fn read_unary(
        &self,
        response: Response<hyper::body::Incoming>,
    ) -> Result<RawResponse, Status> {
        let (parts, mut body) = response.into_parts();
        let (codec, mut metadata, encoding) = check_answer(&parts.status, &parts.headers)?;
        if let Some(status) = headers::status_of(&parts.headers) {
            // Trailers-only: the call failed (or succeeded) before any message.
            return match status.code() {
                Code::Ok => Err(Status::new(Code::Internal, "the server sent no message")),
                _ => Err(status),
            };
        }
        let max = self.config.conn.limits.max_frame_len as usize;
        let mut decoder = Decoder::new(max, encoding);
        let mut message = None;
        loop {
            let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        decoder.push(data);
                        while let Some(m) = decoder.next()? {
                            if message.replace(m).is_some() {
                                return Err(Status::new(
                                    Code::Internal,
                                    "more than one message in a unary answer",
                                ));
                            }
                        }
                    }
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let status = headers::status_of(&trailers).ok_or_else(missing_status)?;
                        if !status.is_ok() {
                            return Err(status);
                        }
                        headers::collect_metadata(&trailers, &mut metadata)?;
                        let body = message.ok_or_else(|| {
                            Status::new(Code::Internal, "the server sent no message")
                        })?;
                        return Ok(RawResponse {
                            codec,
                            metadata,
                            body,
                        });
                    }
                },
                Some(Err(e)) => return Err(request_failed(e)),
                None => return Err(missing_status()),
            }
        }
    }
}

fn missing_status() -> Status {
    Status::new(Code::Internal, "the answer ended without a grpc-status")
}

/// What a gRPC answer's headers must say: HTTP 200, a gRPC content type, an encoding
/// gorpc speaks. Returns the codec, the header metadata and the encoding.
fn check_answer(
    status: &StatusCode,
    headers: &HeaderMap,
) -> Result<(u8, Metadata, Encoding), Status> {
    if *status != StatusCode::OK {
        return Err(headers::status_of(headers).unwrap_or_else(|| http_failure(*status)));
    }
    let codec = headers
        .get(CONTENT_TYPE)
        .and_then(|value| headers::content_codec(value.as_bytes()).ok().flatten())
        .ok_or_else(|| {
            headers::status_of(headers).unwrap_or_else(|| {
                Status::new(Code::Unknown, "the answer is not gRPC (content-type)")
            })
        })?;
    let encoding = match headers.get(GRPC_ENCODING) {
        None => Encoding::Identity,
        Some(value) => Encoding::parse(value.as_bytes()).ok_or_else(|| {
            Status::new(
                Code::Internal,
                format!("the answer's grpc-encoding {value:?} is not supported"),
            )
        })?,
    };
    let mut metadata = Metadata::new();
    headers::collect_metadata(headers, &mut metadata)?;
    Ok((codec, metadata, encoding))
}

async fn connect_to<R: Runtime>(
    runtime: &R,
    config: &ConnectionConfig,
    addr: SocketAddr,
    deadline: Instant,
) -> Result<SendRequest<EdgeBody>, Status> {
    let connected = crate::client::connect_socket(runtime, addr, deadline, config).await?;
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let mut tls = tls.clone();
        // ALPN h2: gRPC servers behind TLS pick their protocol by it.
        if tls.config.alpn_protocols.is_empty() {
            let mut with_alpn = (*tls.config).clone();
            with_alpn.alpn_protocols = vec![b"h2".to_vec()];
            tls.config = Arc::new(with_alpn);
        }
        let session =
            crate::client::tls_connect(runtime, connected, addr, deadline, tls, config).await?;
        return handshake(runtime, config, session).await;
    }
    handshake(runtime, config, connected).await
}

async fn handshake<R: Runtime, I: Io>(
    runtime: &R,
    config: &ConnectionConfig,
    io: I,
) -> Result<SendRequest<EdgeBody>, Status> {
    let mut builder = hyper::client::conn::http2::Builder::new(HyperExecutor(runtime.clone()));
    builder
        .timer(HyperTimer(runtime.clone()))
        .initial_stream_window_size(config.conn.stream_window)
        .initial_connection_window_size(config.conn.connection_window)
        .max_header_list_size(config.conn.limits.max_head_len)
        .keep_alive_interval(config.conn.keepalive.interval)
        .keep_alive_timeout(config.conn.keepalive.timeout)
        .keep_alive_while_idle(true);
    let (sender, connection) = builder
        .handshake(HyperIo::new(io, BytesMut::new()))
        .await
        .map_err(|e| {
            let chain = crate::http::server::error_chain(&e);
            Status::unavailable(format!("HTTP/2 handshake failed: {chain}")).with_source(e)
        })?;
    let gauge = crate::observe::ConnectionGauge::new(crate::observe::Side::Client);
    runtime.spawn(async move {
        let _gauge = gauge;
        if let Err(error) = connection.await {
            tracing::debug!(%error, "gRPC connection ended");
        }
    });
    Ok(sender)
}

/// A stream call as its halves and its driver task share it.
#[derive(Debug, Default)]
struct StreamCall {
    /// The request body's task: the sender queued messages or half-closed.
    request: AtomicWaker,
    /// The response pump: the receiver took messages, or gave up.
    response: AtomicWaker,
    /// Response bytes delivered and not yet taken.
    held: AtomicUsize,
    cancelled: AtomicBool,
}

impl StreamControl for StreamCall {
    fn ready(&self, _: CallId) -> bool {
        self.request.wake();
        !self.cancelled.load(Ordering::Relaxed)
    }

    fn release(&self, _: CallId, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.response.wake();
    }
}

impl StreamDriver for StreamCall {
    fn cancel(&self, _: CallId) {
        self.cancelled.store(true, Ordering::Relaxed);
        self.response.wake();
        self.request.wake();
    }
}

/// A client stream's messages as the request body: whatever the sender queued, then the
/// end once it half-closed.
struct RequestStream {
    outbox: Arc<Outbox>,
    driver: Arc<StreamCall>,
}

impl Body for RequestStream {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.driver.request.register(cx.waker());
        let taken = self.outbox.take();
        if !taken.messages.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(taken.messages))));
        }
        if taken.close_send {
            return Poll::Ready(None);
        }
        if self.driver.cancelled.load(Ordering::Relaxed) || self.outbox.is_ended() {
            // Resets the stream.
            return Poll::Ready(Some(Err(Status::new(Code::Cancelled, "call cancelled"))));
        }
        Poll::Pending
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Moves a stream call's answer into its receiver's inbox: messages while the receiver
/// keeps up (HTTP/2 credit goes back as they are read), then the status.
struct ResponsePump {
    inbox: Arc<Inbox<StreamEnd>>,
    driver: Arc<StreamCall>,
    window: usize,
    max: usize,
    /// A client-streaming call: its one message is the answer's body, not a stream item.
    one_response: bool,
}

impl ResponsePump {
    /// Runs the call to its end; `None` if the receiver gave up (nobody to tell).
    async fn run<R: Runtime>(
        &self,
        runtime: &R,
        response: impl std::future::Future<Output = hyper::Result<Response<hyper::body::Incoming>>>,
        deadline: Option<Instant>,
    ) -> Option<StreamEnd> {
        let mut sleep = deadline.map(|d| runtime.sleep_until(d));
        let mut response = std::pin::pin!(response);
        let driver = &self.driver;
        let expired = |sleep: &mut Option<R::Sleep>, cx: &mut Context<'_>| {
            sleep
                .as_mut()
                .is_some_and(|s| Pin::new(s).poll(cx).is_ready())
        };
        let response = poll_fn(|cx| {
            driver.response.register(cx.waker());
            if driver.cancelled.load(Ordering::Relaxed) {
                return Poll::Ready(None);
            }
            if let Poll::Ready(response) = response.as_mut().poll(cx) {
                return Poll::Ready(Some(response.map_err(request_failed)));
            }
            if expired(&mut sleep, cx) {
                return Poll::Ready(Some(Err(deadline_exceeded())));
            }
            Poll::Pending
        })
        .await?;
        let response = match response {
            Ok(response) => response,
            Err(status) => return Some(Err(status)),
        };
        let (parts, mut body) = response.into_parts();
        let (codec, mut metadata, encoding) = match check_answer(&parts.status, &parts.headers) {
            Ok(checked) => checked,
            Err(status) => return Some(Err(status)),
        };
        if let Some(status) = headers::status_of(&parts.headers) {
            return Some(Ok(StreamAnswer {
                status,
                codec,
                metadata,
                body: Bytes::new(),
            }));
        }
        let mut decoder = Decoder::new(self.max, encoding);
        let mut run = VecDeque::new();
        let mut single = None;
        poll_fn(|cx| loop {
            driver.response.register(cx.waker());
            if driver.cancelled.load(Ordering::Relaxed) {
                return Poll::Ready(None);
            }
            if expired(&mut sleep, cx) {
                return Poll::Ready(Some(Err(deadline_exceeded())));
            }
            if driver.held.load(Ordering::Relaxed) >= self.window {
                return Poll::Pending;
            }
            let frame = match Pin::new(&mut body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Some(Err(missing_status()))),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(request_failed(e)))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    let trailers = frame.into_trailers().unwrap_or_default();
                    let Some(status) = headers::status_of(&trailers) else {
                        return Poll::Ready(Some(Err(missing_status())));
                    };
                    if let Err(status) = headers::collect_metadata(&trailers, &mut metadata) {
                        return Poll::Ready(Some(Err(status)));
                    }
                    let body = single.take().unwrap_or_default();
                    return Poll::Ready(Some(Ok(StreamAnswer {
                        status,
                        codec,
                        metadata: std::mem::take(&mut metadata),
                        body,
                    })));
                }
            };
            decoder.push(data);
            let mut len = 0;
            loop {
                match decoder.next() {
                    Ok(Some(message)) if self.one_response => single = Some(message),
                    Ok(Some(message)) => {
                        len += message.len();
                        run.push_back(message);
                    }
                    Ok(None) => break,
                    Err(status) => return Poll::Ready(Some(Err(status))),
                }
            }
            if !run.is_empty() {
                driver.held.fetch_add(len, Ordering::Relaxed);
                if !self.inbox.push(&mut run) {
                    return Poll::Ready(None);
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn errors_after_the_deadline_are_the_deadlines() {
        let passed = Some(Instant::now() - Duration::from_millis(1));
        let cancelled = Status::new(Code::Cancelled, "Timeout expired");
        let status = after_deadline(cancelled.clone(), passed);
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("Timeout expired"), "{status}");
        // Before the deadline, or without one, the server's word stands.
        let ahead = Some(Instant::now() + Duration::from_secs(60));
        assert_eq!(
            after_deadline(cancelled.clone(), ahead).code(),
            Code::Cancelled
        );
        assert_eq!(after_deadline(cancelled, None).code(), Code::Cancelled);
    }
}
