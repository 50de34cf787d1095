//! tower interop: any [`tower::Layer`](tower_layer::Layer) around a server's calls
//! ([`Server::layer`](crate::Server::layer)) or a client's ([`Client::layer`]), and a
//! [`Client`] is itself a [`tower::Service`](tower_service::Service) of [`OutgoingCall`]s.
//!
//! ```no_run
//! # use std::net::SocketAddr;
//! # async fn demo<R: gorpc::Runtime>(
//! #     runtime: R,
//! #     router: gorpc::Router,
//! #     addr: SocketAddr,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower::timeout::TimeoutLayer;
//!
//! // A handler still running after 2 s is dropped; its call ends `DeadlineExceeded`.
//! let server = gorpc::Server::new(runtime.clone(), router)
//!     .layer(TimeoutLayer::new(Duration::from_secs(2)))
//!     .bind(addr)
//!     .await?;
//!
//! let client = gorpc::Client::builder(runtime)
//!     .endpoint(addr)
//!     .connect()
//!     .await?
//!     .layer(TimeoutLayer::new(Duration::from_millis(500)));
//! # Ok(()) }
//! ```
//!
//! With tower's `limit` feature, `.layer(LoadShedLayer::new())` then
//! `.layer(ConcurrencyLimitLayer::new(64))` keeps at most 64 calls in the handlers and
//! refuses the next at once, with `ResourceExhausted`.
//!
//! Layers run in the order added, the first outermost. On a server they wrap the
//! interceptors and the service; on a client they sit between the interceptors and the
//! network. They stack as one tower service ([`ServerCalls`], [`ClientCalls`]), so an outer
//! layer sees an inner one's readiness: `LoadShed` sheds when `ConcurrencyLimit` is full.
//! The stack is cloned for each call, as tower expects (`ConcurrencyLimit`'s clones share
//! their semaphore); a service that is not `Clone` because its state is its own
//! (`RateLimit`) goes behind a `tower::buffer::Buffer`, which shares it.
//!
//! On the server, layers see unary calls and the opening of stream calls (a stream's
//! messages pass by, as they pass interceptors); on the client, layers see unary calls and
//! streams go around them. Errors a layer returns become statuses: tower's `Elapsed`
//! (timeout) `DeadlineExceeded`, its `Overloaded` (load shedding) `ResourceExhausted`, a
//! [`Status`] itself, anything else `Unknown` with the error's text.
//!
//! tower's timeout, rate limit and buffer use tokio's timer or spawner, so they need a
//! tokio context around the call: on gorpc-tokio they just work; on gorpc-smol, spawn the
//! tasks under async-compat (`Smol::with_spawner(|task| { smol::spawn(Compat::new(task)).detach(); })`).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use gorpc_proto::{Code, Status, StreamKind};
use tower::util::BoxCloneSyncService;
use tower::ServiceExt as _;
use tower_service::Service as TowerService;

use crate::client::{Client, OutgoingCall, RawResponse, Route};
use crate::service::{MethodSchema, ServerReply, ServerRequest, Service};

/// Errors of tower services, as tower passes them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server's calls as its layers wrap them: its interceptors and service, and the layers
/// added before.
pub type ServerCalls = BoxCloneSyncService<ServerRequest, ServerReply, BoxError>;

/// A client's calls as its layers wrap them: the network, and the layers added before.
pub type ClientCalls = BoxCloneSyncService<OutgoingCall, RawResponse, BoxError>;

/// One server layer, applied when the server starts.
pub(crate) type ServerLayer = Box<dyn FnOnce(ServerCalls) -> ServerCalls + Send>;

/// `layer` as a server applies it.
pub(crate) fn server_layer<L>(layer: L) -> ServerLayer
where
    L: tower_layer::Layer<ServerCalls> + Send + 'static,
    L::Service: TowerService<ServerRequest, Response = ServerReply> + Clone + Send + Sync + 'static,
    <L::Service as TowerService<ServerRequest>>::Error: Into<BoxError>,
    <L::Service as TowerService<ServerRequest>>::Future: Send + 'static,
{
    Box::new(move |inner| BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into)))
}

/// `service` behind `layers` (the first outermost), as a gorpc service again; `service`
/// itself when there is no layer.
pub(crate) fn layered(service: Arc<dyn Service>, layers: Vec<ServerLayer>) -> Arc<dyn Service> {
    if layers.is_empty() {
        return service;
    }
    let base = BoxCloneSyncService::new(AsTower(service.clone()).map_err(BoxError::from));
    let tower = layers
        .into_iter()
        .rev()
        .fold(base, |inner, apply| apply(inner));
    Arc::new(Layered { tower, service })
}

/// A gorpc service as a tower service.
#[derive(Clone)]
struct AsTower(Arc<dyn Service>);

impl TowerService<ServerRequest> for AsTower {
    type Response = ServerReply;
    type Error = Infallible;
    type Future = futures::future::Map<
        BoxFuture<'static, ServerReply>,
        fn(ServerReply) -> Result<ServerReply, Infallible>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ServerRequest) -> Self::Future {
        self.0.call(request).map(Ok)
    }
}

/// A server's layered stack as a gorpc service. What the transports ask about methods
/// (schemas, stream kinds) is answered by the service inside.
struct Layered {
    tower: ServerCalls,
    service: Arc<dyn Service>,
}

impl Service for Layered {
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        self.tower
            .clone()
            .oneshot(request)
            .map(|outcome| outcome.unwrap_or_else(|error| ServerReply::error(status_of(error))))
            .boxed()
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        self.service.schema(method)
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        self.service.stream_kind(method)
    }

    fn method_paths(&self) -> Vec<String> {
        self.service.method_paths()
    }

    fn has_method(&self, method: &str) -> bool {
        self.service.has_method(method)
    }
}

/// The status a call gets for a tower error.
pub fn status_of(error: BoxError) -> Status {
    let error = match error.downcast::<Status>() {
        Ok(status) => return *status,
        Err(error) => error,
    };
    if error.is::<tower::timeout::error::Elapsed>() {
        return Status::deadline_exceeded("timed out in a tower layer");
    }
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::resource_exhausted("overloaded: a tower layer shed the call");
    }
    Status::new(Code::Unknown, error.to_string())
}

/// A client's layers over its route.
pub(crate) struct ClientStack {
    /// Where the calls go below the layers; stream calls go straight there.
    base: Route,
    /// Each layer, the first outermost, kept to stack them again with the next one.
    layers: Vec<Arc<dyn Fn(ClientCalls) -> ClientCalls + Send + Sync>>,
    tower: ClientCalls,
}

impl ClientStack {
    pub(crate) fn base(&self) -> &Route {
        &self.base
    }

    pub(crate) async fn send(&self, call: OutgoingCall) -> Result<RawResponse, Status> {
        self.tower.clone().oneshot(call).await.map_err(status_of)
    }
}

/// A client's route as the innermost tower service of its stack.
#[derive(Clone)]
struct RouteService(Route);

impl TowerService<OutgoingCall> for RouteService {
    type Response = RawResponse;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<RawResponse, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: OutgoingCall) -> Self::Future {
        let route = self.0.clone();
        Box::pin(async move { route.send(call).await.map_err(BoxError::from) })
    }
}

impl TowerService<OutgoingCall> for Client {
    type Response = RawResponse;
    type Error = Status;
    type Future = BoxFuture<'static, Result<RawResponse, Status>>;

    /// Always ready: the readiness of the client's own layers is awaited in the call.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    /// Sends `call` through the client's interceptors and layers, as
    /// [`Client::call_raw`] does.
    fn call(&mut self, call: OutgoingCall) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.send(call, Some(Instant::now())).await })
    }
}

impl Client {
    /// Sends this client's unary calls through `layer`, below its interceptors and above
    /// the network; layers run in the order added, the first outermost. Stream calls pass
    /// by.
    pub fn layer<L>(mut self, layer: L) -> Client
    where
        L: tower_layer::Layer<ClientCalls> + Send + Sync + 'static,
        L::Service:
            TowerService<OutgoingCall, Response = RawResponse> + Clone + Send + Sync + 'static,
        <L::Service as TowerService<OutgoingCall>>::Error: Into<BoxError>,
        <L::Service as TowerService<OutgoingCall>>::Future: Send + 'static,
    {
        let (base, mut layers) = match self.route() {
            Route::Layered(stack) => (stack.base.clone(), stack.layers.clone()),
            route => (route.clone(), Vec::new()),
        };
        layers.push(Arc::new(move |inner| {
            BoxCloneSyncService::new(layer.layer(inner).map_err(Into::into))
        }));
        let innermost = BoxCloneSyncService::new(RouteService(base.clone()));
        let tower = layers
            .iter()
            .rev()
            .fold(innermost, |inner, apply| apply(inner));
        self.set_route(Route::Layered(Arc::new(ClientStack {
            base,
            layers,
            tower,
        })));
        self
    }
}
