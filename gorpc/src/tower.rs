//! tower interop: any [`tower::Layer`](tower_layer::Layer) around a server's calls
//! ([`Server::layer`](crate::Server::layer)) or a client's ([`Client::layer`]), and a
//! [`Client`] is itself a [`tower::Service`](tower_service::Service) of [`OutgoingCall`]s.
//!
//! ```ignore
//! use std::time::Duration;
//! use tower::limit::ConcurrencyLimitLayer;
//! use tower::load_shed::LoadShedLayer;
//!
//! let server = gorpc::Server::new(runtime, router)
//!     .layer(LoadShedLayer::new())             // outermost: refuse at once when full
//!     .layer(ConcurrencyLimitLayer::new(64));  // at most 64 calls in the handlers
//! ```
//!
//! Layered services are cloned for each call, as tower expects: `ConcurrencyLimit`'s clones
//! share their semaphore, for instance. A service that is not `Clone` because its state is
//! its own (`RateLimit`) goes behind a `tower::buffer::Buffer`, which shares it.
//!
//! Layers see unary calls and the opening of stream calls, as interceptors do. Errors a
//! layer returns become statuses: tower's `Elapsed` (timeout) `DeadlineExceeded`, its
//! `Overloaded` (load shedding) `ResourceExhausted`, a [`Status`] itself, anything else
//! `Unknown` with the error's text.
//!
//! tower's timeout and rate limit wait on tokio's timer, so they need a tokio runtime
//! around the call: on gorpc-tokio they just work; on gorpc-smol, spawn the server's tasks
//! under a tokio context (async-compat's `Compat`, through `Smol::with_spawner`).

use std::convert::Infallible;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use gorpc_proto::{Code, Status, StreamKind};
use tower_service::Service as TowerService;

use crate::client::{Channel, Client, OutgoingCall, RawResponse, StreamHalves};
use crate::service::{MethodSchema, ServerReply, ServerRequest, Service};

/// Errors of tower services, as tower passes them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A server's calls (its interceptors and service) as the tower service its layers wrap.
#[derive(Clone)]
pub struct ServerCalls(Arc<dyn Service>);

impl std::fmt::Debug for ServerCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCalls").finish_non_exhaustive()
    }
}

impl TowerService<ServerRequest> for ServerCalls {
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
        futures::FutureExt::map(self.0.call(request), Ok)
    }
}

/// How a server applies one layer, kept until it serves.
pub(crate) type ApplyLayer = Box<dyn FnOnce(Arc<dyn Service>) -> Arc<dyn Service> + Send>;

/// `layer` as the server applies it.
pub(crate) fn server_layer<L>(layer: L) -> ApplyLayer
where
    L: tower_layer::Layer<ServerCalls> + Send + 'static,
    L::Service: TowerService<ServerRequest, Response = ServerReply> + Clone + Send + Sync + 'static,
    <L::Service as TowerService<ServerRequest>>::Error: Into<BoxError>,
    <L::Service as TowerService<ServerRequest>>::Future: Send + 'static,
{
    Box::new(move |inner: Arc<dyn Service>| {
        let tower = layer.layer(ServerCalls(inner.clone()));
        Arc::new(Layered { tower, inner }) as Arc<dyn Service>
    })
}

/// A layered tower service as a gorpc service. What the transports ask about methods
/// (schemas, stream kinds) is answered by the service inside.
struct Layered<S> {
    tower: S,
    inner: Arc<dyn Service>,
}

impl<S> Service for Layered<S>
where
    S: TowerService<ServerRequest, Response = ServerReply> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        // tower services are called through a clone that was ready: the usual way to share
        // one between concurrent calls.
        let mut tower = self.tower.clone();
        Box::pin(async move {
            if let Err(error) = poll_fn(|cx| tower.poll_ready(cx)).await {
                return ServerReply::error(status_of(error.into()));
            }
            match tower.call(request).await {
                Ok(reply) => reply,
                Err(error) => ServerReply::error(status_of(error.into())),
            }
        })
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        self.inner.schema(method)
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        self.inner.stream_kind(method)
    }

    fn method_paths(&self) -> Vec<String> {
        self.inner.method_paths()
    }

    fn has_method(&self, method: &str) -> bool {
        self.inner.has_method(method)
    }
}

/// The status a call gets for a tower error.
pub fn status_of(error: BoxError) -> Status {
    if let Some(status) = error.downcast_ref::<Status>() {
        return status.clone();
    }
    if error.is::<tower::timeout::error::Elapsed>() {
        return Status::new(Code::DeadlineExceeded, "timed out in a tower layer");
    }
    if error.is::<tower::load_shed::error::Overloaded>() {
        return Status::new(
            Code::ResourceExhausted,
            "overloaded: a tower layer shed the call",
        );
    }
    Status::new(Code::Unknown, error.to_string())
}

impl TowerService<OutgoingCall> for Client {
    type Response = RawResponse;
    type Error = Status;
    type Future = BoxFuture<'static, Result<RawResponse, Status>>;

    /// Always ready: the pool waits for a connection within the call's deadline.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    /// Sends `call` through the client's interceptors, as [`Client::call_raw`] does.
    fn call(&mut self, call: OutgoingCall) -> Self::Future {
        let client = self.clone();
        Box::pin(async move { client.send(call).await })
    }
}

impl Client {
    /// A client whose unary calls go through `layer` wrapped around this client (its
    /// interceptors and connections); stream calls pass by, to this client. Interceptors
    /// added to the result run before the layer.
    pub fn layer<L>(self, layer: L) -> Client
    where
        L: tower_layer::Layer<Client>,
        L::Service:
            TowerService<OutgoingCall, Response = RawResponse> + Clone + Send + Sync + 'static,
        <L::Service as TowerService<OutgoingCall>>::Error: Into<BoxError>,
        <L::Service as TowerService<OutgoingCall>>::Future: Send + 'static,
    {
        let default_timeout = self.default_timeout();
        let channel = LayeredChannel {
            tower: layer.layer(self.clone()),
            streams: self,
        };
        Client::from_channel(channel, default_timeout)
    }
}

/// A client's calls through a tower stack.
struct LayeredChannel<S> {
    tower: S,
    /// Where stream calls go.
    streams: Client,
}

impl<S> Channel for LayeredChannel<S>
where
    S: TowerService<OutgoingCall, Response = RawResponse> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn send(&self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let mut tower = self.tower.clone();
        Box::pin(async move {
            poll_fn(|cx| tower.poll_ready(cx))
                .await
                .map_err(|e| status_of(e.into()))?;
            tower.call(call).await.map_err(|e| status_of(e.into()))
        })
    }

    fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'static, Result<StreamHalves, Status>> {
        let client = self.streams.clone();
        Box::pin(async move { client.start_stream(call, kind).await })
    }
}
