//! Calling: a [`Client`] sends calls through a [`Pool`] of connections.

pub(crate) mod balanced;
mod builder;
mod call;
mod conn;
mod pool;

pub use crate::stream::{
    Bidi, ClientStreaming, RawStreamReceiver, RawStreamSender, ResponseStream, StreamSender,
};
#[cfg(feature = "grpc")]
pub(crate) use balanced::BoxedCalls;
pub use balanced::{InstanceProtocol, InstanceStatus, OutlierDetection};
pub use builder::ClientBuilder;
pub use call::{CallOptions, Channel, OutgoingCall, RawResponse};
pub use conn::{Connection, ConnectionConfig};
pub use pool::{Checkout, EndpointPool, Pool, PoolConfig};

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gorpc_proto::{Code, Status, StreamKind};

use crate::codec::{id_name, Decoder, Encoder, MsgPack};
use crate::interceptor::{ClientInterceptor, ClientNext};
use crate::metadata::Metadata;
use crate::runtime::Runtime;
use crate::service::{Request, Response};
use crate::stream::handoff::{Inbox, InboxReader, Outbox};
#[cfg(feature = "grpc")]
pub(crate) use crate::stream::StreamDriver;
#[cfg(feature = "http")]
pub(crate) use conn::connect_socket;
#[cfg(all(feature = "tls", feature = "http"))]
pub(crate) use conn::tls_connect;
#[cfg(feature = "grpc")]
pub(crate) use conn::StreamAnswer;
pub(crate) use conn::StreamEnd;
use conn::{CallOutcome, ClientStream};

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub pool: PoolConfig,
    /// Applied to calls that set no timeout. `None`: wait as long as the connection lives.
    pub default_timeout: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            pool: PoolConfig::default(),
            default_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Where a client's calls go.
#[derive(Clone)]
enum Route {
    /// Binary-protocol connections; the hot path, no boxing per call.
    Pool(Arc<dyn Pool>),
    /// A service found through discovery, balanced over its instances.
    Balanced(Arc<balanced::Balanced>),
    Channel(Arc<dyn Channel>),
}

/// Sends calls. Cheap to clone; clones share the pool. Generated clients and the
/// codegen-free style both call through it, on any runtime.
#[derive(Clone)]
pub struct Client {
    route: Route,
    default_timeout: Option<Duration>,
    /// Empty unless interceptors were added: calls then skip the chain entirely.
    interceptors: Arc<[Arc<dyn ClientInterceptor>]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("default_timeout", &self.default_timeout)
            .finish_non_exhaustive()
    }
}

/// Calls that never left the client (their connection closed first) are sent again on
/// another connection this many times.
const NOT_SENT_RETRIES: usize = 2;

impl Client {
    /// A client over any pool.
    pub fn new(pool: impl Pool, default_timeout: Option<Duration>) -> Self {
        Client {
            route: Route::Pool(Arc::new(pool)),
            default_timeout,
            interceptors: Arc::new([]),
        }
    }

    /// A client sending through `channel`.
    pub fn from_channel(channel: impl Channel, default_timeout: Option<Duration>) -> Self {
        Client {
            route: Route::Channel(Arc::new(channel)),
            default_timeout,
            interceptors: Arc::new([]),
        }
    }

    /// A client of one endpoint that connects on first use.
    pub fn lazy<R: Runtime>(runtime: R, addr: SocketAddr, config: ClientConfig) -> Self {
        Client::new(
            EndpointPool::new(runtime, addr, config.pool),
            config.default_timeout,
        )
    }

    /// A client of one endpoint, connected before this returns.
    pub async fn connect<R: Runtime>(
        runtime: R,
        addr: SocketAddr,
        config: ClientConfig,
    ) -> Result<Self, Status> {
        let pool = EndpointPool::new(runtime, addr, config.pool);
        pool.warm_up().await?;
        Ok(Client::new(pool, config.default_timeout))
    }

    /// Starts building a client: of a service found through discovery, or of one endpoint.
    pub fn builder<R: Runtime>(runtime: R) -> ClientBuilder<R> {
        ClientBuilder::new(runtime)
    }

    /// The instances of the discovered service as this client sees them now (empty for
    /// clients of one endpoint or a channel).
    pub fn instances(&self) -> Vec<InstanceStatus> {
        match &self.route {
            Route::Balanced(balanced) => balanced.instances(),
            _ => Vec::new(),
        }
    }

    /// Adds an interceptor around every call from this client (and its clones made after
    /// this); interceptors run in the order added.
    pub fn with_interceptor(mut self, interceptor: impl ClientInterceptor) -> Self {
        let mut chain: Vec<_> = self.interceptors.iter().cloned().collect();
        chain.push(Arc::new(interceptor));
        self.interceptors = chain.into();
        self
    }

    /// Sends an encoded body and returns the encoded answer. Dropping the future cancels the
    /// call on the server.
    pub async fn call_raw(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: u8,
        body: Bytes,
        options: CallOptions,
    ) -> Result<RawResponse, Status> {
        let timeout = options.timeout.or(self.default_timeout);
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let call = OutgoingCall {
            method: method.into(),
            codec,
            metadata: options.metadata,
            deadline,
            key: options.key,
            body,
        };
        self.send(call).await
    }

    /// The timeout of calls that set none.
    pub fn default_timeout(&self) -> Option<Duration> {
        self.default_timeout
    }

    /// Sends a call through the interceptors, then to its route.
    pub(crate) async fn send(&self, call: OutgoingCall) -> Result<RawResponse, Status> {
        if self.interceptors.is_empty() {
            return match &self.route {
                Route::Pool(pool) => send(&**pool, call).await,
                Route::Balanced(balanced) => balanced.send(call).await,
                Route::Channel(channel) => channel.send(call).await,
            };
        }
        let route = self.route.clone();
        let send: crate::interceptor::Transmit = Arc::new(move |call| match &route {
            Route::Pool(pool) => {
                let pool = pool.clone();
                Box::pin(async move { send(&*pool, call).await })
            }
            Route::Balanced(balanced) => {
                let balanced = balanced.clone();
                Box::pin(async move { balanced.send(call).await })
            }
            Route::Channel(channel) => channel.send(call),
        });
        ClientNext::start(self.interceptors.clone(), send)
            .run(call)
            .await
    }

    /// A unary call with typed messages in `codec`. Request metadata and deadline are taken
    /// from `request`.
    pub async fn unary<C, Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: C,
        request: Request<Req>,
    ) -> Result<Response<Rsp>, Status>
    where
        C: Encoder<Req> + Decoder<Rsp>,
    {
        let (message, options) = request.into_call();
        self.unary_with(method, codec, &message, options).await
    }

    /// [`unary`](Self::unary) with the message and call options (a timeout, metadata, an
    /// affinity key) apart, the shape of the stream calls and of [`call_with`](Self::call_with).
    pub async fn unary_with<C, Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: C,
        message: &Req,
        options: CallOptions,
    ) -> Result<Response<Rsp>, Status>
    where
        C: Encoder<Req> + Decoder<Rsp>,
    {
        let body = Encoder::<Req>::encode_to_bytes(&codec, message)?;
        let expected = Decoder::<Rsp>::id(&codec);
        let raw = self.call_raw(method, expected, body, options).await?;
        if raw.codec != expected {
            return Err(Status::new(
                Code::Internal,
                format!(
                    "server answered in codec {} ({}), expected {}",
                    raw.codec,
                    id_name(raw.codec),
                    Decoder::<Rsp>::name(&codec)
                ),
            ));
        }
        let message = Decoder::<Rsp>::decode(&codec, raw.body)?;
        Ok(Response {
            message,
            metadata: raw.metadata,
        })
    }

    /// Starts a stream call of `kind` and returns its halves (a server-streaming call's
    /// sender takes nothing and may be dropped). `request` is the one request message of a
    /// server-streaming call and must be empty otherwise. The deadline (the call's timeout,
    /// or the client's default) covers the whole stream. Client interceptors run their
    /// [`intercept_stream`](ClientInterceptor::intercept_stream) on the opening call. A
    /// discovered service's stream goes to the instance its balancer picks (one that
    /// cannot be reached is skipped, as for unary calls); streams need the binary
    /// protocol or gRPC, so HTTP and UDP clients refuse them with `Unimplemented`.
    pub async fn stream_raw(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: u8,
        kind: StreamKind,
        request: Bytes,
        options: CallOptions,
    ) -> Result<StreamHalves, Status> {
        let timeout = options.timeout.or(self.default_timeout);
        let call = OutgoingCall {
            method: method.into(),
            codec,
            metadata: options.metadata,
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            key: options.key,
            body: request,
        };
        self.start_stream(call, kind).await
    }

    /// Starts a stream call through the interceptors' `intercept_stream`, then its route.
    pub(crate) async fn start_stream(
        &self,
        mut call: OutgoingCall,
        kind: StreamKind,
    ) -> Result<StreamHalves, Status> {
        for interceptor in self.interceptors.iter() {
            interceptor.intercept_stream(&mut call)?;
        }
        match &self.route {
            Route::Pool(pool) => start_stream_on(&**pool, call, kind)
                .await
                .map_err(|(status, _)| status),
            Route::Balanced(balanced) => balanced.start_stream(call, kind).await,
            Route::Channel(channel) => channel.start_stream(call, kind).await,
        }
    }

    /// A server-streaming call: one request message, a stream of typed responses that ends
    /// with the call's status (an error status is the last item). `options` (a timeout,
    /// metadata, an affinity key) apply as to any call; the timeout covers the whole
    /// stream.
    pub async fn server_stream<C, Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: C,
        message: &Req,
        options: CallOptions,
    ) -> Result<ResponseStream<Rsp>, Status>
    where
        C: Encoder<Req> + Decoder<Rsp>,
        Rsp: 'static,
    {
        let body = Encoder::<Req>::encode_to_bytes(&codec, message)?;
        let id = Decoder::<Rsp>::id(&codec);
        let (_, receiver) = self
            .stream_raw(method, id, StreamKind::ServerStreaming, body, options)
            .await?;
        Ok(ResponseStream::new(receiver, Arc::new(codec)))
    }

    /// A client-streaming call: send typed messages, then finish for the one response.
    pub async fn client_stream<C, Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: C,
        options: CallOptions,
    ) -> Result<ClientStreaming<Req, Rsp>, Status>
    where
        C: Encoder<Req> + Decoder<Rsp> + Clone,
        Req: 'static,
        Rsp: 'static,
    {
        let id = Encoder::<Req>::id(&codec);
        let (sender, receiver) = self
            .stream_raw(
                method,
                id,
                StreamKind::ClientStreaming,
                Bytes::new(),
                options,
            )
            .await?;
        let sender = sender.ok_or_else(no_sender)?;
        Ok(ClientStreaming::new(
            StreamSender::new(sender, Arc::new(codec.clone())),
            receiver,
            Arc::new(codec),
        ))
    }

    /// A bidirectional call: a sender of typed messages and a stream of typed responses,
    /// used independently (from two tasks if need be; [`Bidi::into_parts`] splits them).
    pub async fn bidi<C, Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: C,
        options: CallOptions,
    ) -> Result<Bidi<Req, Rsp>, Status>
    where
        C: Encoder<Req> + Decoder<Rsp> + Clone,
        Req: 'static,
        Rsp: 'static,
    {
        let id = Encoder::<Req>::id(&codec);
        let (sender, receiver) = self
            .stream_raw(method, id, StreamKind::Bidirectional, Bytes::new(), options)
            .await?;
        let sender = sender.ok_or_else(no_sender)?;
        Ok(Bidi {
            sender: StreamSender::new(sender, Arc::new(codec.clone())),
            responses: ResponseStream::new(receiver, Arc::new(codec)),
        })
    }

    /// The codegen-free style: serde types over msgpack.
    pub async fn call<Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        request: &Req,
    ) -> Result<Rsp, Status>
    where
        Req: serde::Serialize,
        Rsp: serde::de::DeserializeOwned,
    {
        self.call_with(method, request, CallOptions::default())
            .await
    }

    /// [`call`](Self::call) with a timeout or metadata.
    pub async fn call_with<Req, Rsp>(
        &self,
        method: impl Into<Cow<'static, str>>,
        request: &Req,
        options: CallOptions,
    ) -> Result<Rsp, Status>
    where
        Req: serde::Serialize,
        Rsp: serde::de::DeserializeOwned,
    {
        let body = Encoder::<Req>::encode_to_bytes(&MsgPack, request)?;
        let raw = self
            .call_raw(method, gorpc_proto::codec::MSGPACK, body, options)
            .await?;
        Decoder::<Rsp>::decode(&MsgPack, raw.body)
    }
}

/// A stream call whose client streams came back without its sending half: a [`Channel`]
/// that broke its contract.
fn no_sender() -> Status {
    Status::internal("the stream call started without its sending half")
}

/// Sends `call` on a connection from `pool`, again on another one if it never left.
async fn send(pool: &dyn Pool, call: OutgoingCall) -> Result<RawResponse, Status> {
    send_on(pool, call)
        .await
        .unwrap_or_else(|(status, _)| Err(status))
}

/// A connection of `pool` for a call due by `deadline`, waiting for one if it must.
async fn checkout(pool: &dyn Pool, deadline: Option<Instant>) -> Result<Connection, Status> {
    match pool.checkout(deadline) {
        Checkout::Ready(conn) => Ok(conn),
        Checkout::Wait(wait) => wait.await,
        Checkout::Failed(status) => Err(status),
    }
}

/// A stream call's halves: the sender (client-streaming and bidirectional calls only) and
/// the receiver.
pub type StreamHalves = (Option<RawStreamSender>, RawStreamReceiver);

/// Starts a stream call on a connection of `pool`; a call no connection took comes back
/// with the reason, so that it can go to another endpoint.
pub(crate) async fn start_stream_on(
    pool: &dyn Pool,
    mut call: OutgoingCall,
    kind: StreamKind,
) -> Result<StreamHalves, (Status, OutgoingCall)> {
    for _ in 0..=NOT_SENT_RETRIES {
        let conn = match checkout(pool, call.deadline).await {
            Ok(conn) => conn,
            Err(status) => return Err((status, call)),
        };
        let outbox = Arc::new(Outbox::new(None));
        let inbox = Arc::new(Inbox::default());
        let stream = ClientStream {
            outbox: outbox.clone(),
            inbox: inbox.clone(),
        };
        match conn.start_stream(call, kind, stream) {
            Ok(()) => {
                let commands: Arc<dyn crate::stream::StreamDriver> =
                    Arc::new(conn::Commands(conn.commands()));
                let sender = kind
                    .client_streams()
                    .then(|| RawStreamSender::new(outbox.clone(), commands.clone()));
                let reader = InboxReader::new(inbox);
                let receiver = RawStreamReceiver::new(reader, outbox, commands);
                return Ok((sender, receiver));
            }
            Err(unsent) => call = unsent,
        }
    }
    let status = Status::new(
        Code::Unavailable,
        "no connection stayed open long enough to start the stream",
    );
    Err((status, call))
}

/// [`send`], but a call for which the pool had no connection comes back with the reason,
/// so that it can go to another endpoint.
async fn send_on(
    pool: &dyn Pool,
    mut call: OutgoingCall,
) -> Result<Result<RawResponse, Status>, (Status, OutgoingCall)> {
    for _ in 0..=NOT_SENT_RETRIES {
        let conn = match checkout(pool, call.deadline).await {
            Ok(conn) => conn,
            Err(status) => return Err((status, call)),
        };
        let pending = match conn.start(call) {
            Ok(pending) => pending,
            Err(unsent) => {
                call = unsent;
                continue;
            }
        };
        match pending.await {
            CallOutcome::Answered(rsp) if rsp.status.is_ok() => {
                let metadata = Metadata::from_wire(rsp.head.metadata(), rsp.head.as_bytes());
                return Ok(Ok(RawResponse {
                    codec: rsp.codec,
                    metadata,
                    body: rsp.body,
                }));
            }
            CallOutcome::Answered(rsp) => return Ok(Err(rsp.status)),
            CallOutcome::Failed(status) => return Ok(Err(status)),
            CallOutcome::NotSent(unsent) => call = unsent,
        }
    }
    let status = Status::new(
        Code::Unavailable,
        "no connection stayed open long enough to send the call",
    );
    Err((status, call))
}
