//! The server side as users see it: a [`Service`] answers raw calls; a [`Router`] maps method
//! paths to handlers of typed messages.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use gorpc_proto::{Code, RequestHead, Status, StreamKind};

use crate::client::CallOptions;
use crate::codec::{id_name, Decoder, Encoder, MsgPack};
use crate::metadata::Metadata;
use crate::runtime::PeerCertificates;
use crate::stream::{RawRequestStream, RawResponseSink, RequestStream, ResponseSink};

/// The stream halves of a stream call, for its handler to take. A clone of the request
/// carries none: a stream has one reader and one writer.
#[derive(Default)]
pub(crate) struct CallStreams {
    pub(crate) requests: Option<RawRequestStream>,
    pub(crate) responses: Option<RawResponseSink>,
}

impl Clone for CallStreams {
    fn clone(&self) -> Self {
        CallStreams::default()
    }
}

impl std::fmt::Debug for CallStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStreams")
            .field("requests", &self.requests.is_some())
            .field("responses", &self.responses.is_some())
            .finish()
    }
}

/// One call as it arrived, body still encoded.
#[derive(Clone, Debug)]
pub struct ServerRequest {
    /// Stream halves of a stream call; empty for unary calls.
    pub(crate) streams: CallStreams,
    pub(crate) head: RequestHead,
    /// Metadata changed by an interceptor; until then it is read from `head` on demand.
    pub(crate) edited: Option<Metadata>,
    /// Codec id of the body (see [`gorpc_proto::codec`]); the answer is expected in it.
    pub codec: u8,
    /// The encoded request message; empty when the client streams.
    pub body: Bytes,
    /// When the client stops waiting, on this host's clock. `None`: no deadline.
    pub deadline: Option<Instant>,
    /// The client's address; `None` for a request built by hand.
    pub peer: Option<SocketAddr>,
    /// The client's certificate chain, when it authenticated with one (mutual TLS).
    pub(crate) peer_certificates: Option<PeerCertificates>,
}

impl ServerRequest {
    /// Builds a request by hand, e.g. to test a service without a connection.
    pub fn new(method: &str, codec: u8, metadata: &Metadata, body: Bytes) -> Self {
        let mut raw = bytes::BytesMut::new();
        gorpc_proto::head::encode_request_head(method, 0, metadata.iter(), &mut raw);
        let head = RequestHead::decode(raw.freeze()).expect("a head this crate encoded decodes");
        ServerRequest {
            head,
            edited: None,
            codec,
            body,
            deadline: None,
            peer: None,
            peer_certificates: None,
            streams: CallStreams::default(),
        }
    }

    /// The client's message stream of a client-streaming or bidirectional call, once (the
    /// handler's to read). `None` for other calls and for clones of the request.
    pub fn take_request_stream(&mut self) -> Option<RawRequestStream> {
        self.streams.requests.take()
    }

    /// The response stream of a server-streaming or bidirectional call, once. `None` for
    /// other calls and for clones of the request.
    pub fn take_response_sink(&mut self) -> Option<RawResponseSink> {
        self.streams.responses.take()
    }

    /// The certificate chain the client authenticated with over mutual TLS, end entity
    /// first. `None` over plain TCP and for TLS clients without a certificate.
    pub fn peer_certificates(&self) -> Option<&PeerCertificates> {
        self.peer_certificates.as_ref()
    }

    /// Sets the client's certificate chain, e.g. to test a service without a connection.
    pub fn with_peer_certificates(mut self, chain: Option<PeerCertificates>) -> Self {
        self.peer_certificates = chain;
        self
    }

    /// "/package.Service/Method".
    pub fn method(&self) -> &str {
        self.head.method()
    }

    /// The call's metadata (a copy; see [`metadata_value`](Self::metadata_value) for one
    /// key).
    pub fn metadata(&self) -> Metadata {
        match &self.edited {
            Some(metadata) => metadata.clone(),
            None => Metadata::from_wire(self.head.metadata(), self.head.as_bytes()),
        }
    }

    /// The metadata, for an interceptor to change before the handler sees it. Copied out of
    /// the frame on first use only.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        let head = &self.head;
        self.edited
            .get_or_insert_with(|| Metadata::from_wire(head.metadata(), head.as_bytes()))
    }

    /// The first metadata value for `key`, without copying the rest.
    pub fn metadata_value(&self, key: &str) -> Option<&[u8]> {
        match &self.edited {
            Some(metadata) => metadata.get(key).map(|v| v.as_ref()),
            None => self.head.metadata_value(key),
        }
    }
}

/// The answer to a call: a status, metadata and an encoded body (empty on errors).
#[derive(Clone, Debug)]
pub struct ServerReply {
    /// How the call ended.
    pub status: Status,
    /// Metadata sent back with the status.
    pub metadata: Metadata,
    /// The encoded response message, in the request's codec.
    pub body: Bytes,
}

impl ServerReply {
    /// A successful answer with `body` and no metadata.
    pub fn ok(body: Bytes) -> Self {
        ServerReply {
            status: Status::ok(),
            metadata: Metadata::new(),
            body,
        }
    }

    /// An error answer. A status with a retry hint ([`Status::with_retry_after`]) sends it
    /// as `grpc-retry-pushback-ms`.
    pub fn error(status: Status) -> Self {
        let mut metadata = Metadata::new();
        if let Some(wait) = status.retry_after() {
            metadata.insert(
                crate::metadata::RETRY_PUSHBACK,
                wait.as_millis().to_string(),
            );
        }
        ServerReply {
            status,
            metadata,
            body: Bytes::new(),
        }
    }
}

/// Answers calls. Implemented by [`Router`] and by generated code; implement it directly
/// for full control (a proxy, say).
pub trait Service: Send + Sync + 'static {
    /// Answers one call. A stream call's handler takes its halves out of `request`.
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply>;

    /// What `method`'s bodies are, for transports that translate them (JSON over HTTP).
    /// `None` (the default) when unknown: bodies then reach the handler as they came. The
    /// binary protocol never asks.
    fn schema(&self, method: &str) -> Option<MethodSchema> {
        let _ = method;
        None
    }

    /// Which sides of `method` stream, if it is a stream method; `None` (the default) for
    /// unary methods and unknown ones. The connection driver asks before each call, to
    /// hand a stream method its halves ([`ServerRequest::take_request_stream`],
    /// [`ServerRequest::take_response_sink`]) and to refuse a call framed for another kind.
    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        let _ = method;
        None
    }

    /// The method paths this service answers, where it knows them (a [`Router`] does);
    /// empty by default. Health checks and reflection name the hosted services from them.
    fn method_paths(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether `method` may be answered (`true`, the default, when the service cannot
    /// tell). A transport refuses an unknown method with `Unimplemented` before reading its
    /// request: a gRPC client holding its request stream open must not wait for that.
    fn has_method(&self, method: &str) -> bool {
        let _ = method;
        true
    }
}

impl<S: Service + ?Sized> Service for Arc<S> {
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        (**self).call(request)
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        (**self).schema(method)
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        (**self).stream_kind(method)
    }

    fn method_paths(&self) -> Vec<String> {
        (**self).method_paths()
    }

    fn has_method(&self, method: &str) -> bool {
        (**self).has_method(method)
    }
}

/// The native body format of one method, as [`Service::schema`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MethodSchema {
    /// MessagePack of serde types with structs as maps ([`MsgPack`]): what
    /// [`Router::msgpack`] and `#[gorpc::service]` servers speak. Any JSON value has a
    /// msgpack equivalent, so JSON translates without a schema.
    MsgPack,
    /// Protobuf messages ([`crate::Protobuf`]), as gorpc-build's servers speak them.
    Protobuf {
        /// An encoded `google.protobuf.FileDescriptorSet` declaring both messages and
        /// everything they import.
        descriptors: &'static [u8],
        /// The request message's full name, e.g. "helloworld.HelloRequest".
        input: &'static str,
        /// The response message's full name.
        output: &'static str,
    },
}

impl MethodSchema {
    /// The codec id of bodies in this format.
    pub fn codec(&self) -> u8 {
        match self {
            MethodSchema::MsgPack => gorpc_proto::codec::MSGPACK,
            MethodSchema::Protobuf { .. } => gorpc_proto::codec::PROTOBUF,
        }
    }
}

/// A decoded request message with its call's context.
#[derive(Clone, Debug)]
pub struct Request<T> {
    /// The request message (a stream of them for client-streaming methods).
    pub message: T,
    /// The call's metadata.
    pub metadata: Metadata,
    /// When the client stops waiting; `None`: no deadline. A caller's deadline becomes the
    /// call's timeout.
    pub deadline: Option<Instant>,
    /// The client's address, on the server; `None` when unknown or on the client.
    pub peer: Option<SocketAddr>,
}

impl<T> Request<T> {
    /// `message` without metadata, deadline or peer.
    pub fn new(message: T) -> Self {
        Request {
            message,
            metadata: Metadata::new(),
            deadline: None,
            peer: None,
        }
    }

    /// The message alone.
    pub fn into_inner(self) -> T {
        self.message
    }

    /// The message, and the options of a call that sends it: the deadline as the timeout
    /// (`None` without one) and the metadata. What a caller's [`Request`] becomes on the
    /// way out.
    pub fn into_call(self) -> (T, CallOptions) {
        let options = CallOptions {
            timeout: self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now())),
            metadata: self.metadata,
            key: None,
        };
        (self.message, options)
    }
}

/// A message, or a message with call context: what generated clients accept.
pub trait IntoRequest<T> {
    /// This value as a request: a bare message gets no metadata and no deadline.
    fn into_request(self) -> Request<T>;
}

impl<T> IntoRequest<T> for T {
    fn into_request(self) -> Request<T> {
        Request::new(self)
    }
}

impl<T> IntoRequest<T> for Request<T> {
    fn into_request(self) -> Request<T> {
        self
    }
}

/// A response message with the metadata to send back.
#[derive(Clone, Debug)]
pub struct Response<T> {
    /// The response message.
    pub message: T,
    /// Metadata sent back with it (received, on the client).
    pub metadata: Metadata,
}

impl<T> Response<T> {
    /// `message` without metadata.
    pub fn new(message: T) -> Self {
        Response {
            message,
            metadata: Metadata::new(),
        }
    }

    /// The message alone.
    pub fn into_inner(self) -> T {
        self.message
    }
}

type Handler = Arc<dyn Fn(ServerRequest) -> BoxFuture<'static, ServerReply> + Send + Sync>;

/// One routed method: its handler and, when known, its body format.
#[derive(Clone)]
struct Route {
    handler: Handler,
    schema: Option<MethodSchema>,
    stream: Option<StreamKind>,
}

/// Routes calls by method path. Unknown methods get `Unimplemented`.
#[derive(Clone, Default)]
pub struct Router {
    /// A table fixed once built, so lookups by names from the network cannot degrade it:
    /// the fast hash, not SipHash.
    routes: HashMap<Box<str>, Route, foldhash::fast::RandomState>,
    /// Any stream route: without one, [`Service::stream_kind`] answers without a lookup.
    has_streams: bool,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("methods", &self.routes.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Router {
    /// A router with no routes: every call gets `Unimplemented`.
    pub fn new() -> Self {
        Router::default()
    }

    /// Routes `method` to a handler of raw calls.
    pub fn route<F, Fut>(mut self, method: &str, handler: F) -> Self
    where
        F: Fn(ServerRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServerReply> + Send + 'static,
    {
        let route = Route {
            handler: Arc::new(move |req| handler(req).boxed()),
            schema: None,
            stream: None,
        };
        self.routes.insert(method.into(), route);
        self
    }

    /// Routes `method` to a handler of typed messages in `codec`.
    pub fn unary<C, Req, Rsp, F, Fut>(self, method: &str, codec: C, handler: F) -> Self
    where
        C: Decoder<Req> + Encoder<Rsp> + Clone,
        Req: Send + 'static,
        Rsp: Send + 'static,
        F: Fn(Request<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Rsp>, Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.route(method, move |req: ServerRequest| {
            let handler = handler.clone();
            unary_call(req, codec.clone(), move |request| handler(request))
        })
    }

    /// Routes every method of a service (a generated server, say) to it.
    pub fn add_service<S: NamedService>(mut self, service: S) -> Self {
        let service: Arc<S> = Arc::new(service);
        for method in S::METHODS {
            let schema = service.schema(method);
            let stream = service.stream_kind(method);
            self.has_streams |= stream.is_some();
            let service = service.clone();
            let route = Route {
                handler: Arc::new(move |req| service.call(req)),
                schema,
                stream,
            };
            self.routes.insert((*method).into(), route);
        }
        self
    }

    /// The codegen-free style: a handler of serde types, msgpack on the wire.
    pub fn msgpack<Req, Rsp, F, Fut>(self, method: &str, handler: F) -> Self
    where
        Req: serde::de::DeserializeOwned + Send + 'static,
        Rsp: serde::Serialize + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rsp, Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut router = self.unary(method, MsgPack, move |req: Request<Req>| {
            let fut = handler(req.message);
            async move { fut.await.map(Response::new) }
        });
        if let Some(route) = router.routes.get_mut(method) {
            route.schema = Some(MethodSchema::MsgPack);
        }
        router
    }

    /// Routes `method`, a stream method of `kind`, to a handler of raw calls that takes its
    /// halves from the request ([`ServerRequest::take_request_stream`],
    /// [`ServerRequest::take_response_sink`]).
    pub fn stream_route<F, Fut>(mut self, method: &str, kind: StreamKind, handler: F) -> Self
    where
        F: Fn(ServerRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ServerReply> + Send + 'static,
    {
        let route = Route {
            handler: Arc::new(move |req| handler(req).boxed()),
            schema: None,
            stream: Some(kind),
        };
        self.routes.insert(method.into(), route);
        self.has_streams = true;
        self
    }

    /// Routes a server-streaming `method`: one request in, the handler writes its response
    /// stream to the sink; returning `Ok` ends the stream with status OK, `Err` with that
    /// status. Sending waits for the client's flow-control credit.
    pub fn server_stream<C, Req, Rsp, F, Fut>(self, method: &str, codec: C, handler: F) -> Self
    where
        C: Decoder<Req> + Encoder<Rsp> + Clone,
        Req: Send + 'static,
        Rsp: Send + 'static,
        F: Fn(Request<Req>, ResponseSink<Rsp>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.stream_route(method, StreamKind::ServerStreaming, move |req| {
            let handler = handler.clone();
            server_stream_call(req, codec.clone(), move |request, sink| {
                handler(request, sink)
            })
        })
    }

    /// Routes a client-streaming `method`: the handler reads the client's messages from the
    /// request stream (it ends when the client finishes) and answers with one response.
    pub fn client_stream<C, Req, Rsp, F, Fut>(self, method: &str, codec: C, handler: F) -> Self
    where
        C: Decoder<Req> + Encoder<Rsp> + Clone,
        Req: Send + 'static,
        Rsp: Send + 'static,
        F: Fn(Request<RequestStream<Req>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Rsp>, Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.stream_route(method, StreamKind::ClientStreaming, move |req| {
            let handler = handler.clone();
            client_stream_call(req, codec.clone(), move |request| handler(request))
        })
    }

    /// Routes a bidirectional `method`: the handler reads the client's messages and writes
    /// its own, in any interleaving; returning ends the call with the status.
    pub fn bidi<C, Req, Rsp, F, Fut>(self, method: &str, codec: C, handler: F) -> Self
    where
        C: Decoder<Req> + Encoder<Rsp> + Clone,
        Req: Send + 'static,
        Rsp: Send + 'static,
        F: Fn(Request<RequestStream<Req>>, ResponseSink<Rsp>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        self.stream_route(method, StreamKind::Bidirectional, move |req| {
            let handler = handler.clone();
            bidi_call(req, codec.clone(), move |request, sink| {
                handler(request, sink)
            })
        })
    }

    /// The method paths routed.
    pub fn methods(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(|k| k.as_ref())
    }

    /// Whether `method` has a route.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    pub(crate) fn serves(&self, method: &str) -> bool {
        self.routes.contains_key(method)
    }
}

/// A service that knows its method paths, so a [`Router`] can host it beside others.
/// Generated servers implement it.
pub trait NamedService: Service {
    /// Every method path the service answers, "/package.Service/Method".
    const METHODS: &'static [&'static str];
}

/// Runs one unary call: decodes the request with `codec`, runs `handler`, encodes its
/// answer. The glue of [`Router::unary`] and of generated servers.
pub fn unary_call<C, Req, Rsp, F, Fut>(
    req: ServerRequest,
    codec: C,
    handler: F,
) -> BoxFuture<'static, ServerReply>
where
    C: Decoder<Req> + Encoder<Rsp>,
    Req: Send + 'static,
    Rsp: Send + 'static,
    F: FnOnce(Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Rsp>, Status>> + Send + 'static,
{
    let future = match decode_request::<C, Req>(&codec, req) {
        Ok(request) => handler(request),
        Err(status) => return futures::future::ready(ServerReply::error(status)).boxed(),
    };
    async move {
        match future.await {
            Ok(rsp) => match Encoder::<Rsp>::encode_to_bytes(&codec, &rsp.message) {
                Ok(body) => ServerReply {
                    status: Status::ok(),
                    metadata: rsp.metadata,
                    body,
                },
                Err(status) => ServerReply::error(status),
            },
            Err(status) => ServerReply::error(status),
        }
    }
    .boxed()
}

/// Runs one server-streaming call: decodes the request with `codec`, hands `handler` the
/// typed response sink, and ends the stream with the handler's status. The glue of
/// [`Router::server_stream`] and of generated servers; the service must report the method
/// as [`StreamKind::ServerStreaming`] in [`Service::stream_kind`].
pub fn server_stream_call<C, Req, Rsp, F, Fut>(
    mut req: ServerRequest,
    codec: C,
    handler: F,
) -> BoxFuture<'static, ServerReply>
where
    C: Decoder<Req> + Encoder<Rsp>,
    Req: Send + 'static,
    Rsp: Send + 'static,
    F: FnOnce(Request<Req>, ResponseSink<Rsp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let sink = req.take_response_sink();
    let started = match (decode_request::<C, Req>(&codec, req), sink) {
        (Ok(request), Some(sink)) => handler(request, ResponseSink::new(sink, Arc::new(codec))),
        (Err(status), _) => return ready_error(status),
        (Ok(_), None) => return ready_error(no_stream()),
    };
    async move { stream_reply(started.await) }.boxed()
}

/// Runs one client-streaming call: hands `handler` the client's messages as a typed
/// stream and encodes its one response. The glue of [`Router::client_stream`] and of
/// generated servers (stream kind [`StreamKind::ClientStreaming`]).
pub fn client_stream_call<C, Req, Rsp, F, Fut>(
    req: ServerRequest,
    codec: C,
    handler: F,
) -> BoxFuture<'static, ServerReply>
where
    C: Decoder<Req> + Encoder<Rsp> + Clone,
    Req: Send + 'static,
    Rsp: Send + 'static,
    F: FnOnce(Request<RequestStream<Req>>) -> Fut,
    Fut: Future<Output = Result<Response<Rsp>, Status>> + Send + 'static,
{
    let started = match stream_request(&codec, req) {
        Ok((request, _)) => handler(request),
        Err(status) => return ready_error(status),
    };
    async move {
        match started.await.and_then(|rsp| {
            Encoder::<Rsp>::encode_to_bytes(&codec, &rsp.message).map(|b| (b, rsp.metadata))
        }) {
            Ok((body, metadata)) => ServerReply {
                status: Status::ok(),
                metadata,
                body,
            },
            Err(status) => ServerReply::error(status),
        }
    }
    .boxed()
}

/// Runs one bidirectional call: hands `handler` the client's messages and the response
/// sink, and ends the call with the handler's status. The glue of [`Router::bidi`] and of
/// generated servers (stream kind [`StreamKind::Bidirectional`]).
pub fn bidi_call<C, Req, Rsp, F, Fut>(
    req: ServerRequest,
    codec: C,
    handler: F,
) -> BoxFuture<'static, ServerReply>
where
    C: Decoder<Req> + Encoder<Rsp> + Clone,
    Req: Send + 'static,
    Rsp: Send + 'static,
    F: FnOnce(Request<RequestStream<Req>>, ResponseSink<Rsp>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let started = match stream_request(&codec, req) {
        Ok((request, Some(sink))) => handler(request, ResponseSink::new(sink, Arc::new(codec))),
        Ok((_, None)) => return ready_error(no_stream()),
        Err(status) => return ready_error(status),
    };
    async move { stream_reply(started.await) }.boxed()
}

fn ready_error(status: Status) -> BoxFuture<'static, ServerReply> {
    futures::future::ready(ServerReply::error(status)).boxed()
}

/// The answer to a method a service does not have.
pub fn unimplemented(req: &ServerRequest) -> BoxFuture<'static, ServerReply> {
    let status = Status::new(
        Code::Unimplemented,
        format!("unknown method {}", req.method()),
    );
    futures::future::ready(ServerReply::error(status)).boxed()
}

fn no_stream() -> Status {
    Status::new(
        Code::Internal,
        "a stream method was called without its stream (not through a connection?)",
    )
}

fn stream_reply(result: Result<(), Status>) -> ServerReply {
    match result {
        Ok(()) => ServerReply::ok(Bytes::new()),
        Err(status) => ServerReply::error(status),
    }
}

/// The request of a call whose client streams, and its response sink if it has one.
type StreamRequest<Req> = (Request<RequestStream<Req>>, Option<RawResponseSink>);

fn stream_request<C, Req>(codec: &C, mut req: ServerRequest) -> Result<StreamRequest<Req>, Status>
where
    C: Decoder<Req> + Clone,
{
    check_codec(codec, &req)?;
    let stream = req.take_request_stream().ok_or_else(no_stream)?;
    let sink = req.take_response_sink();
    let request = Request {
        message: RequestStream::new(stream, Arc::new(codec.clone())),
        metadata: req.metadata(),
        deadline: req.deadline,
        peer: req.peer,
    };
    Ok((request, sink))
}

fn check_codec<C: Decoder<Req>, Req>(codec: &C, req: &ServerRequest) -> Result<(), Status> {
    if req.codec == codec.id() {
        return Ok(());
    }
    Err(Status::new(
        Code::InvalidArgument,
        format!(
            "{} expects {} bodies, got codec {} ({})",
            req.method(),
            codec.name(),
            req.codec,
            id_name(req.codec)
        ),
    ))
}

fn decode_request<C: Decoder<Req>, Req>(
    codec: &C,
    req: ServerRequest,
) -> Result<Request<Req>, Status> {
    check_codec(codec, &req)?;
    let metadata = req.metadata();
    let message = codec.decode(req.body)?;
    Ok(Request {
        message,
        metadata,
        deadline: req.deadline,
        peer: req.peer,
    })
}

impl Service for Router {
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        match self.routes.get(request.method()) {
            Some(route) => (route.handler)(request),
            None => {
                let status = Status::new(
                    Code::Unimplemented,
                    format!("unknown method {}", request.method()),
                );
                futures::future::ready(ServerReply::error(status)).boxed()
            }
        }
    }

    fn has_method(&self, method: &str) -> bool {
        self.routes.contains_key(method)
    }

    fn method_paths(&self) -> Vec<String> {
        self.routes.keys().map(|path| path.to_string()).collect()
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        self.routes.get(method).and_then(|route| route.schema)
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        if !self.has_streams {
            return None;
        }
        self.routes.get(method).and_then(|route| route.stream)
    }
}
