//! Calling: a [`Client`] sends calls through a [`Pool`] of connections.

pub(crate) mod balanced;
mod builder;
mod call;
mod conn;
mod pool;
mod send_on;

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
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, Either};
use futures::FutureExt as _;
use gorpc_proto::{Code, Status, StreamKind};
use tracing::Instrument as _;

use crate::codec::{id_name, Decoder, Encoder, MsgPack};
use crate::interceptor::{client_listeners, ClientInterceptor, ClientNext};
use crate::observe::{CallEnd, ObservedCall, Observer, Side, WatchGuard};
use crate::runtime::Runtime;
use crate::service::{Request, Response};
use crate::stream::handoff::{Inbox, InboxReader, Outbox};
#[cfg(feature = "grpc")]
pub(crate) use crate::stream::StreamDriver;
#[cfg(feature = "http")]
pub(crate) use conn::connect_socket;
#[cfg(all(feature = "tls", feature = "http"))]
pub(crate) use conn::tls_connect;
use conn::ClientStream;
#[cfg(feature = "grpc")]
pub(crate) use conn::StreamAnswer;
pub(crate) use conn::StreamEnd;
pub(crate) use send_on::send_on;

/// Client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Connections to each endpoint (per instance, for a discovered service).
    pub pool: PoolConfig,
    /// Applied to unary calls that set no timeout. `None`: wait as long as the connection
    /// lives. A stream call has no deadline unless it sets a timeout of its own: a watch
    /// may rightly run for hours.
    pub default_timeout: Option<Duration>,
    /// Ends a stream call whose receiver has waited this long for the server's next
    /// message (or its end), with `DeadlineExceeded`, cancelling it on the server: a stream
    /// whose server went quiet. `None` (the default): wait as long as the call lives.
    pub stream_idle_timeout: Option<Duration>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            pool: PoolConfig::default(),
            default_timeout: Some(Duration::from_secs(30)),
            stream_idle_timeout: None,
        }
    }
}

/// A runtime's timer, for the stream halves a client hands out.
pub(crate) type Timer = Arc<dyn Fn(Instant) -> BoxFuture<'static, ()> + Send + Sync>;

/// `runtime`'s timer.
pub(crate) fn timer_of<R: Runtime>(runtime: R) -> Timer {
    Arc::new(move |at| Box::pin(runtime.sleep_until(at)))
}

/// How long a stream's receiver may wait for the next message, and the timer to tell.
#[derive(Clone)]
pub(crate) struct StreamIdle {
    pub(crate) timeout: Duration,
    pub(crate) timer: Timer,
}

/// Where a client's calls go.
#[derive(Clone)]
pub(crate) enum Route {
    /// Binary-protocol connections; the hot path, no boxing per call.
    Pool(Arc<dyn Pool>),
    /// A service found through discovery, balanced over its instances.
    Balanced(Arc<balanced::Balanced>),
    Channel(Arc<dyn Channel>),
    /// One of the others behind tower layers.
    #[cfg(feature = "tower")]
    Layered(Arc<crate::tower::ClientStack>),
}

impl Route {
    /// Sends `call` here: no interceptor runs.
    ///
    /// Not an async fn, and only the pool's future kept inline: a future is copied whole
    /// at each layer it is awaited through, and an async fn's is as large as its largest
    /// branch, so the larger ones (a balancer's, a tower stack's) are boxed.
    pub(crate) fn send(
        &self,
        call: OutgoingCall,
    ) -> Either<
        impl Future<Output = Result<RawResponse, Status>> + Send + '_,
        BoxFuture<'_, Result<RawResponse, Status>>,
    > {
        match self {
            Route::Pool(pool) => Either::Left(
                send_on(&**pool, call).map(|sent| sent.unwrap_or_else(|unsent| Err(unsent.0))),
            ),
            Route::Balanced(balanced) => Either::Right(Box::pin(balanced.send(call))),
            Route::Channel(channel) => Either::Right(channel.send(call)),
            #[cfg(feature = "tower")]
            Route::Layered(stack) => Either::Right(Box::pin(stack.send(call))),
        }
    }

    /// Starts a stream call here.
    pub(crate) fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'_, Result<StreamHalves, Status>> {
        match self {
            Route::Pool(pool) => Box::pin(async move {
                start_stream_on(&**pool, call, kind)
                    .await
                    .map_err(|(status, _)| status)
            }),
            Route::Balanced(balanced) => Box::pin(balanced.start_stream(call, kind)),
            Route::Channel(channel) => channel.start_stream(call, kind),
            #[cfg(feature = "tower")]
            Route::Layered(stack) => stack.base().start_stream(call, kind),
        }
    }
}

/// Sends calls. Cheap to clone; clones share the pool. Generated clients and the
/// codegen-free style both call through it, on any runtime.
#[derive(Clone)]
pub struct Client {
    route: Route,
    default_timeout: Option<Duration>,
    stream_idle: Option<StreamIdle>,
    /// Empty unless interceptors were added: calls then skip the chain entirely.
    interceptors: Arc<[Arc<dyn ClientInterceptor>]>,
    /// Where calls' ends are reported: metrics, spans, the interceptors' `on_end`.
    observer: Arc<Observer>,
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
        Client::over(Route::Pool(Arc::new(pool)), default_timeout, None)
    }

    /// A client sending through `channel`.
    pub fn from_channel(channel: impl Channel, default_timeout: Option<Duration>) -> Self {
        Client::over(Route::Channel(Arc::new(channel)), default_timeout, None)
    }

    /// A client of `route`.
    fn over(
        route: Route,
        default_timeout: Option<Duration>,
        stream_idle: Option<StreamIdle>,
    ) -> Self {
        Client {
            route,
            default_timeout,
            stream_idle,
            interceptors: Arc::new([]),
            observer: Arc::new(Observer::new(Side::Client, Vec::new())),
        }
    }

    /// A client of `route` with `config`'s timeouts and `interceptors`.
    pub(crate) fn assembled<R: Runtime>(
        runtime: R,
        route: Route,
        config: &ClientConfig,
        interceptors: Vec<Arc<dyn ClientInterceptor>>,
    ) -> Self {
        let idle = stream_idle(runtime, config);
        let mut client = Client::over(route, config.default_timeout, idle);
        let listeners = client_listeners(&interceptors);
        client.observer = Arc::new(client.observer.with_listeners(listeners));
        client.interceptors = interceptors.into();
        client
    }

    /// A client of `channel` with `config`'s timeouts, on `runtime`'s timer.
    #[cfg(feature = "http")]
    pub(crate) fn of_channel<R: Runtime>(
        runtime: R,
        channel: impl Channel,
        config: &ClientConfig,
    ) -> Self {
        let idle = stream_idle(runtime, config);
        Client::over(
            Route::Channel(Arc::new(channel)),
            config.default_timeout,
            idle,
        )
    }

    /// A client of one endpoint that connects on first use.
    pub fn lazy<R: Runtime>(runtime: R, addr: SocketAddr, config: ClientConfig) -> Self {
        let idle = stream_idle(runtime.clone(), &config);
        let pool = EndpointPool::new(runtime, addr, config.pool);
        Client::over(Route::Pool(Arc::new(pool)), config.default_timeout, idle)
    }

    /// A client of one endpoint, connected before this returns.
    pub async fn connect<R: Runtime>(
        runtime: R,
        addr: SocketAddr,
        config: ClientConfig,
    ) -> Result<Self, Status> {
        let idle = stream_idle(runtime.clone(), &config);
        let pool = EndpointPool::new(runtime, addr, config.pool);
        pool.warm_up().await?;
        let route = Route::Pool(Arc::new(pool));
        Ok(Client::over(route, config.default_timeout, idle))
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
        let listeners = client_listeners(&chain);
        self.observer = Arc::new(self.observer.with_listeners(listeners));
        self.interceptors = chain.into();
        self
    }

    /// Sends an encoded body and returns the encoded answer. Dropping the future cancels the
    /// call on the server. The call's time (its deadline, its duration) counts from here.
    pub fn call_raw(
        &self,
        method: impl Into<Cow<'static, str>>,
        codec: u8,
        body: Bytes,
        options: CallOptions,
    ) -> impl Future<Output = Result<RawResponse, Status>> + Send + '_ {
        // Not an async fn: the call is built now and `send`'s future is returned as it
        // is, rather than copied into one more future around it.
        let timeout = options.timeout.or(self.default_timeout);
        // The clock is read for a deadline, or for a duration someone keeps.
        let now = (timeout.is_some() || self.observer.times_calls()).then(Instant::now);
        let call = OutgoingCall {
            method: method.into(),
            codec,
            metadata: options.metadata,
            deadline: timeout.zip(now).and_then(|(t, now)| now.checked_add(t)),
            key: options.key,
            body,
        };
        self.send(call, now)
    }

    /// The timeout of unary calls that set none.
    pub fn default_timeout(&self) -> Option<Duration> {
        self.default_timeout
    }

    #[cfg(feature = "tower")]
    pub(crate) fn route(&self) -> &Route {
        &self.route
    }

    #[cfg(feature = "tower")]
    pub(crate) fn set_route(&mut self, route: Route) {
        self.route = route;
    }

    /// Sends a call made at `now` (`None`: untimed), watched from start to end, through
    /// the interceptors, then to its route.
    pub(crate) fn send(
        &self,
        call: OutgoingCall,
        now: Option<Instant>,
    ) -> impl Future<Output = Result<RawResponse, Status>> + Send + '_ {
        let observer = &*self.observer;
        let watch = observer.start_client(&call.method, now);
        observer.request_bytes(&watch, call.body.len());
        let call = if self.interceptors.is_empty() {
            Either::Left(self.route.send(call))
        } else {
            Either::Right(self.intercepted(call))
        };
        ObservedCall::new(call, observer, watch)
    }

    /// The interceptors, then the route.
    fn intercepted(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let route = self.route.clone();
        let send: crate::interceptor::Transmit = Arc::new(move |call| {
            let route = route.clone();
            Box::pin(async move { route.send(call).await })
        });
        ClientNext::start(self.interceptors.clone(), send).run(call)
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
    /// server-streaming call and must be empty otherwise. A timeout in `options` covers the
    /// whole stream; without one the stream has no deadline (the client's default timeout
    /// is for unary calls), and [`ClientConfig::stream_idle_timeout`] ends a stream whose
    /// server has gone quiet. Client interceptors run their
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
        let now = Instant::now();
        let call = OutgoingCall {
            method: method.into(),
            codec,
            metadata: options.metadata,
            deadline: options.timeout.and_then(|t| now.checked_add(t)),
            key: options.key,
            body: request,
        };
        self.start_stream(call, kind, now).await
    }

    /// Starts a stream call made at `now` through the interceptors' `intercept_stream`,
    /// then its route. The receiver watches it to its end.
    pub(crate) async fn start_stream(
        &self,
        mut call: OutgoingCall,
        kind: StreamKind,
        now: Instant,
    ) -> Result<StreamHalves, Status> {
        let watch = self.observer.start_client(&call.method, Some(now));
        self.observer.request_bytes(&watch, call.body.len());
        let span = watch.span.clone();
        let mut watch = WatchGuard::new(self.observer.clone(), watch, CallEnd::Cancelled);
        let started = async {
            for interceptor in self.interceptors.iter() {
                interceptor.intercept_stream(&mut call)?;
            }
            self.route.start_stream(call, kind).await
        }
        .instrument(span)
        .await;
        match started {
            Ok((sender, receiver)) => {
                let receiver = receiver.watched(watch, self.stream_idle.clone());
                Ok((sender, receiver))
            }
            Err(status) => {
                watch.end(CallEnd::of_client_error(&status), Some(&status));
                Err(status)
            }
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

/// The stream idle timeout of `config`, on `runtime`'s timer.
fn stream_idle<R: Runtime>(runtime: R, config: &ClientConfig) -> Option<StreamIdle> {
    let timeout = config.stream_idle_timeout?;
    Some(StreamIdle {
        timeout,
        timer: timer_of(runtime),
    })
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
        crate::observe::record_peer(conn.peer());
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
