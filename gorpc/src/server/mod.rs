//! Serving: accept connections, run a driver per connection, shut down gracefully.

mod admission;
pub(crate) mod conn;
pub(crate) mod idle;
mod serving;
pub(crate) mod stop;
mod trim;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable, BoxFuture};
use gorpc_proto::{Code, ConnConfig, Status};

use crate::discovery::{Register, Registration};
use crate::interceptor::{server_listeners, ServerChain, ServerInterceptor};
use crate::observe::{CallWatch, ConnectionGauge, MethodName, MethodSlots, Observer, Side};
use crate::runtime::{timeout, Listener, Runtime};
use crate::service::Service;
pub use admission::AdmissionConfig;
use conn::{ServerConnection, Signals};
pub(crate) use serving::Serving;

/// Server settings.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Limits and keepalive of each connection (see [`gorpc_proto::Limits`]).
    pub conn: ConnConfig,
    /// Connections served at once; one more is told `ResourceExhausted` and closed.
    pub max_connections: usize,
    /// How long a binary-protocol connection may go without a call in flight before the
    /// server closes it with a go-away (answering pings does not count). `None` keeps idle
    /// connections open; they can still be closed to admit a new one at `max_connections`.
    pub idle_timeout: Option<Duration>,
    /// Server-wide admission: calls running at once and waiting, across every connection;
    /// beyond them a call is refused `ResourceExhausted` with a retry hint before any
    /// interceptor or handler runs. `None` (the default): only the per-connection
    /// concurrency limit applies.
    pub admission: Option<AdmissionConfig>,
    /// Connections one peer IP may hold open at once; one more is told
    /// `ResourceExhausted` and closed. `None` (the default): no cap.
    pub max_connections_per_ip: Option<usize>,
    /// Connections the kernel may hold completed before the accept loop takes them
    /// (default [`DEFAULT_LISTEN_BACKLOG`](crate::runtime::DEFAULT_LISTEN_BACKLOG), 1024):
    /// room for a burst of connects, such as every client of a restarted server coming
    /// back at once.
    pub listen_backlog: u32,
    /// HTTP's own limits, when the server answers HTTP ([`Server::http`]).
    #[cfg(feature = "http")]
    pub http: crate::http::HttpConfig,
}

/// How long a server keeps a connection with no call in flight: longer than a client's own
/// idle timeout (5 minutes), so that well-behaved clients close first.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for ServerConfig {
    fn default() -> Self {
        let mut conn = ConnConfig::default();
        // Clients ping; the server only answers unless told otherwise, and notices dead
        // clients through TCP.
        conn.keepalive.interval = Some(Duration::from_secs(120));
        conn.keepalive.timeout = Duration::from_secs(20);
        ServerConfig {
            conn,
            max_connections: 10_000,
            listen_backlog: crate::runtime::DEFAULT_LISTEN_BACKLOG,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            max_connections_per_ip: None,
            admission: None,
            #[cfg(feature = "http")]
            http: crate::http::HttpConfig::default(),
        }
    }
}

/// A server that is not running yet.
pub struct Server<R: Runtime> {
    runtime: R,
    service: Arc<dyn Service>,
    interceptors: Vec<Arc<dyn ServerInterceptor>>,
    /// tower layers around the interceptors and the service, outermost first.
    #[cfg(feature = "tower")]
    layers: Vec<crate::tower::ServerLayer>,
    config: ServerConfig,
    registrations: Vec<(Arc<dyn Register>, Registration)>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Also answer HTTP/1.1 on the port.
    #[cfg(feature = "http")]
    http: bool,
    /// GET endpoints beside the RPC routes, by path.
    #[cfg(feature = "http")]
    endpoints: std::collections::HashMap<String, crate::http::GetHandler>,
    /// Mount gRPC's health service, following this server's state.
    #[cfg(feature = "grpc")]
    health: bool,
    /// Mount gRPC's reflection service, describing this server's services.
    #[cfg(feature = "grpc")]
    reflection: bool,
}

/// How long an accepted connection may take to finish its TLS handshake.
#[cfg(feature = "tls")]
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl<R: Runtime> std::fmt::Debug for Server<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> Server<R> {
    /// A server of `service` on `runtime`, with [`ServerConfig::default`]; nothing is bound
    /// until [`bind`](Self::bind).
    pub fn new(runtime: R, service: impl Service) -> Self {
        Server {
            runtime,
            service: Arc::new(service),
            interceptors: Vec::new(),
            #[cfg(feature = "tower")]
            layers: Vec::new(),
            config: ServerConfig::default(),
            registrations: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "http")]
            http: false,
            #[cfg(feature = "http")]
            endpoints: std::collections::HashMap::new(),
            #[cfg(feature = "grpc")]
            health: false,
            #[cfg(feature = "grpc")]
            reflection: false,
        }
    }

    /// Serves `grpc.health.v1.Health` (Check, Watch, List) beside the service: every
    /// service it routes reads SERVING while the server serves, NOT_SERVING once it shuts
    /// down or is told ([`ServerHandle::set_serving`]); change a service's own status with
    /// [`ServerHandle::health`]. Kubernetes gRPC probes and load balancers call it. It is
    /// answered beside the interceptors (an auth interceptor does not lock probes out),
    /// over every protocol the server speaks.
    #[cfg(feature = "grpc")]
    pub fn health(mut self) -> Self {
        self.health = true;
        self
    }

    /// Serves gRPC server reflection (`grpc.reflection.v1` and `v1alpha`) beside the
    /// service, describing every method it routes with protobuf descriptors (what
    /// gorpc-build generates), so that grpcurl, Postman and `gorpc call` need no .proto
    /// file. Answered beside the interceptors, like [`health`](Self::health).
    #[cfg(feature = "grpc")]
    pub fn reflection(mut self) -> Self {
        self.reflection = true;
        self
    }

    /// Also answers HTTP/1.1 on the same port (`POST /package.Service/Method`, see
    /// [`crate::http`]): each connection's first bytes tell the protocols apart. `GET
    /// /healthz` answers 200 while the server serves and 503 once it drains, for load
    /// balancers and probes.
    #[cfg(feature = "http")]
    pub fn http(mut self) -> Self {
        self.http = true;
        self
    }

    /// Answers `GET path` (and `HEAD`) over HTTP with `handler`, beside the RPC routes;
    /// turns HTTP on ([`http`](Self::http)). A handler for `/healthz` replaces the built-in
    /// one.
    ///
    /// ```no_run
    /// # fn demo<R: gorpc::Runtime>(server: gorpc::Server<R>) -> gorpc::Server<R> {
    /// use gorpc::http::Response;
    /// server.get("/version", |_request| async { Response::new("1.2.3\n".into()) })
    /// # }
    /// ```
    #[cfg(feature = "http")]
    pub fn get<F, Fut>(mut self, path: &str, handler: F) -> Self
    where
        F: Fn(crate::http::Request<()>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = crate::http::Response<bytes::Bytes>> + Send + 'static,
    {
        let handler: crate::http::GetHandler = Arc::new(move |request| Box::pin(handler(request)));
        self.endpoints.insert(path.to_owned(), handler);
        self.http = true;
        self
    }

    /// Announces this server in `registry` once [`bind`](Self::bind) has bound its port;
    /// graceful shutdown withdraws it before draining.
    pub fn register(mut self, registry: impl Register, registration: Registration) -> Self {
        self.registrations.push((Arc::new(registry), registration));
        self
    }

    /// Serves over TLS: every accepted connection completes a handshake under `config`
    /// before its first request. A client certificate verifier in `config` makes it mutual
    /// TLS; handlers then see the client's chain in `ServerRequest::peer_certificates`. A
    /// failed handshake closes that connection only.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// All the settings at once: replaces what the setters below set before it.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds an interceptor around every call; interceptors run in the order added.
    pub fn interceptor(mut self, interceptor: impl ServerInterceptor) -> Self {
        self.interceptors.push(Arc::new(interceptor));
        self
    }

    /// Wraps the server's calls (its interceptors, then its service) in a tower layer:
    /// `tower::limit::ConcurrencyLimitLayer`, `tower::load_shed::LoadShedLayer`, a layer of
    /// your own (see [`crate::tower`]). Layers run in the order added, the first outermost,
    /// all before the interceptors. gRPC's health and reflection services stay beside
    /// them, like beside interceptors.
    #[cfg(feature = "tower")]
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower_layer::Layer<crate::tower::ServerCalls> + Send + 'static,
        L::Service: tower_service::Service<crate::ServerRequest, Response = crate::ServerReply>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower_service::Service<crate::ServerRequest>>::Error:
            Into<crate::tower::BoxError>,
        <L::Service as tower_service::Service<crate::ServerRequest>>::Future: Send + 'static,
    {
        self.layers.push(crate::tower::server_layer(layer));
        self
    }

    /// Connections served at once ([`ServerConfig::max_connections`]).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// Closes connections idle this long ([`ServerConfig::idle_timeout`]); `None`: never.
    pub fn idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.config.idle_timeout = idle;
        self
    }

    /// Bounds the calls running and waiting server-wide ([`ServerConfig::admission`]).
    pub fn admission(mut self, admission: AdmissionConfig) -> Self {
        self.config.admission = Some(admission);
        self
    }

    /// Caps the connections one peer IP may hold ([`ServerConfig::max_connections_per_ip`]).
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.config.max_connections_per_ip = Some(n);
        self
    }

    /// Room for connections completed and not yet accepted ([`ServerConfig::listen_backlog`]).
    pub fn listen_backlog(mut self, n: u32) -> Self {
        self.config.listen_backlog = n;
        self
    }

    /// Binds `addr`, starts serving in the background, then registers the server where
    /// [`register`](Self::register) said. A registration that fails stops the server and
    /// fails the bind, naming the registry's reason.
    pub async fn bind(mut self, addr: SocketAddr) -> io::Result<ServerHandle<R>> {
        let listener = self.runtime.bind(addr, self.config.listen_backlog).await?;
        let registrations = std::mem::take(&mut self.registrations);
        let mut handle = self.serve(listener)?;
        for (registry, registration) in registrations {
            if let Err(status) = handle.register(registry, registration).await {
                handle.abort().await;
                return Err(io::Error::other(status));
            }
        }
        Ok(handle)
    }

    /// Serves connections accepted on `listener`, in the background. Registrations need
    /// [`bind`](Self::bind), or [`ServerHandle::register`] after this.
    pub fn serve(self, listener: R::Listener) -> io::Result<ServerHandle<R>> {
        if !self.registrations.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "Server::register needs bind(); after serve(), use ServerHandle::register",
            ));
        }
        let local_addr = listener.local_addr()?;
        let serving = Arc::new(Serving::default());
        let (stopper, signals, alive, keep_open) = stop::stopper(serving.clone());
        let listeners = server_listeners(&self.interceptors);
        let chain = ServerChain::wrap(self.interceptors, self.service);
        #[cfg(feature = "tower")]
        let chain = crate::tower::layered(chain, self.layers);
        // Outside the interceptors and layers: a refused call costs them nothing. Inside
        // the standard services: health checks answer under overload.
        let chain = match self.config.admission {
            Some(admission) => admission::Admitted::wrap(chain, admission, self.runtime.clone()),
            None => chain,
        };
        #[cfg(feature = "grpc")]
        let (service, health) = mount_standard(self.health, self.reflection, chain, &serving);
        #[cfg(not(feature = "grpc"))]
        let service = chain;
        let accept = AcceptLoop {
            runtime: self.runtime.clone(),
            listener,
            served: Arc::new(Served::new(service, listeners)),
            config: self.config,
            signals,
            active: Arc::new(AtomicUsize::new(0)),
            idle: idle::IdleTable::new(),
            keep_open,
            alive,
            #[cfg(feature = "tls")]
            tls: self.tls.map(|config| {
                #[cfg(feature = "http")]
                let config = offer_alpn(config, self.http);
                config
            }),
            #[cfg(feature = "http")]
            http: self.http.then(|| {
                Arc::new(crate::http::HttpShared::new(
                    self.config.http,
                    self.endpoints,
                ))
            }),
        };
        self.runtime.spawn(accept.run());
        tracing::info!(addr = %local_addr, "serving");
        Ok(ServerHandle {
            runtime: self.runtime,
            local_addr,
            serving,
            #[cfg(feature = "grpc")]
            health,
            stopper,
            registrations: Vec::new(),
        })
    }
}

/// What every connection of one server shares to answer calls: the service, behind its
/// interceptors, and the observer of how its calls end.
pub(crate) struct Served {
    pub(crate) service: Arc<dyn Service>,
    pub(crate) observer: Arc<Observer>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served").finish_non_exhaustive()
    }
}

impl Served {
    pub(crate) fn new(
        service: Arc<dyn Service>,
        listeners: Vec<crate::observe::EndListener>,
    ) -> Self {
        Served {
            service,
            observer: Arc::new(Observer::new(Side::Server, listeners)),
        }
    }

    /// Calls the service and polls the handler once, inside the call's span (where the
    /// handler and the interceptors before it run), catching a panic: a handler ready at
    /// once is answered without a task of its own.
    pub(crate) fn call_inline(
        &self,
        request: crate::service::ServerRequest,
        span: &tracing::Span,
        cx: &mut std::task::Context<'_>,
    ) -> std::thread::Result<(
        futures::future::BoxFuture<'static, crate::service::ServerReply>,
        Poll<crate::service::ServerReply>,
    )> {
        use futures::FutureExt as _;
        let _entered = span.enter();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut future = self.service.call(request);
            let poll = future.poll_unpin(cx);
            (future, poll)
        }))
    }

    /// Starts watching a call to `method` (its `head`'s) that arrived at `now`; `cached`:
    /// the connection's slots, where it keeps them.
    pub(crate) fn watch(
        &self,
        head: &gorpc_proto::RequestHead,
        method: &str,
        cached: Option<&mut MethodSlots>,
        peer: SocketAddr,
        id: Option<u64>,
        now: Instant,
    ) -> CallWatch {
        let known = || self.service.has_method(method);
        let slot = self.observer.slot(method, known, cached);
        let name = || MethodName::Head(head.clone());
        self.observer
            .start(method, slot, name, Some(peer), id, Some(now))
    }
}

/// The service with the standard gRPC services asked for mounted beside it (outside the
/// interceptor chain), and the health service's reporter.
#[cfg(feature = "grpc")]
fn mount_standard(
    with_health: bool,
    with_reflection: bool,
    inner: Arc<dyn Service>,
    serving: &Arc<Serving>,
) -> (
    Arc<dyn Service>,
    Option<crate::grpc::health::HealthReporter>,
) {
    use crate::grpc::{health, reflection};
    if !with_health && !with_reflection {
        return (inner, None);
    }
    let mut standard = crate::service::Router::new();
    let mut services: std::collections::BTreeSet<String> = inner
        .method_paths()
        .iter()
        .filter_map(|path| Some(path.strip_prefix('/')?.rsplit_once('/')?.0.to_owned()))
        .collect();
    let mut reporter = None;
    if with_reflection {
        let mut reflection = reflection::Reflection::of(&*inner);
        if with_health {
            reflection = reflection.register(health::FILE_DESCRIPTOR_SET);
        }
        services.extend(reflection.services().map(str::to_owned));
        standard = standard.add_service(reflection);
    }
    if with_health {
        services.insert("grpc.health.v1.Health".to_owned());
        let health = health::Health::new(serving.clone(), services);
        reporter = Some(health.reporter());
        standard = standard.add_service(health);
    }
    let mounted = Standard { standard, inner };
    (Arc::new(mounted), reporter)
}

/// A service with gRPC's standard services beside it.
#[cfg(feature = "grpc")]
struct Standard {
    standard: crate::service::Router,
    inner: Arc<dyn Service>,
}

#[cfg(feature = "grpc")]
impl Service for Standard {
    fn call(&self, request: crate::ServerRequest) -> BoxFuture<'static, crate::ServerReply> {
        if self.standard.serves(request.method()) {
            self.standard.call(request)
        } else {
            self.inner.call(request)
        }
    }

    fn schema(&self, method: &str) -> Option<crate::MethodSchema> {
        match self.standard.serves(method) {
            true => self.standard.schema(method),
            false => self.inner.schema(method),
        }
    }

    fn stream_kind(&self, method: &str) -> Option<gorpc_proto::StreamKind> {
        match self.standard.serves(method) {
            true => self.standard.stream_kind(method),
            false => self.inner.stream_kind(method),
        }
    }

    fn method_paths(&self) -> Vec<String> {
        let mut paths = self.inner.method_paths();
        paths.extend(self.standard.method_paths());
        paths
    }

    fn has_method(&self, method: &str) -> bool {
        self.standard.serves(method) || self.inner.has_method(method)
    }
}

/// Controls a running server. Dropping it leaves the server running (and registered).
#[derive(Debug)]
pub struct ServerHandle<R: Runtime> {
    runtime: R,
    local_addr: SocketAddr,
    serving: Arc<Serving>,
    /// The statuses of the mounted health service, if any.
    #[cfg(feature = "grpc")]
    health: Option<crate::grpc::health::HealthReporter>,
    stopper: stop::Stopper,
    registrations: Vec<ActiveRegistration>,
}

/// A registration the server keeps up.
struct ActiveRegistration {
    service: String,
    upkeep: AbortHandle,
    deregister: Box<dyn FnOnce() -> BoxFuture<'static, Result<(), Status>> + Send>,
}

impl std::fmt::Debug for ActiveRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActiveRegistration")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Longest wait for a registry to confirm a deregistration at shutdown.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Every connection drained: every call that reached the server was answered.
    Graceful,
    /// The grace period ran out and the remaining connections were closed.
    Forced,
}

impl<R: Runtime> ServerHandle<R> {
    /// The address the server is bound to (with the port the system chose for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The mounted health service's reporter ([`Server::health`]), to set a service's own
    /// status; `None` without it.
    #[cfg(feature = "grpc")]
    pub fn health(&self) -> Option<&crate::grpc::health::HealthReporter> {
        self.health.as_ref()
    }

    /// Sets what health checks report (`GET /healthz` over HTTP: 200 or 503; gRPC's
    /// health service: SERVING or NOT_SERVING) without changing how calls are served: for
    /// instance not serving on SIGTERM, while load balancers and probes take the server
    /// out, before [`shutdown`](Self::shutdown). A shutdown sets it not serving first.
    pub fn set_serving(&self, serving: bool) {
        self.serving.set(serving);
    }

    /// Announces this server in `registry` and keeps the registration up (heartbeats,
    /// lease renewals) on the server's runtime until shutdown. The address is the
    /// registration's own, else the bound one; a wildcard bound address (`0.0.0.0`) needs
    /// [`Registration::with_addr`].
    pub async fn register(
        &mut self,
        registry: impl Register,
        registration: Registration,
    ) -> Result<(), Status> {
        let addr = registration.addr.unwrap_or(self.local_addr);
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(Status::new(
                Code::InvalidArgument,
                format!(
                    "cannot register {:?} at {addr}: clients cannot dial it; set Registration::with_addr",
                    registration.service
                ),
            ));
        }
        let registered = registry.register(&registration, addr).await?;
        tracing::info!(service = %registration.service, %addr, "registered");
        let (upkeep, abort) = AbortHandle::new_pair();
        let task = Abortable::new(registered.upkeep, abort);
        self.runtime.spawn(async move {
            let _ = task.await;
        });
        self.registrations.push(ActiveRegistration {
            service: registration.service,
            upkeep,
            deregister: registered.deregister,
        });
        Ok(())
    }

    /// Withdraws every registration (bounded in time), so clients stop choosing this
    /// server before it drains.
    async fn deregister_all(&mut self, deadline: Instant) {
        for registration in self.registrations.drain(..) {
            registration.upkeep.abort();
            let deadline = deadline.min(Instant::now() + DEREGISTER_TIMEOUT);
            let service = registration.service;
            match timeout(&self.runtime, deadline, (registration.deregister)()).await {
                Some(Ok(())) => {}
                Some(Err(error)) => tracing::warn!(%service, %error, "deregistration failed"),
                None => tracing::warn!(%service, "deregistration timed out"),
            }
        }
    }

    /// Withdraws the server's registrations, stops accepting, tells every client to go
    /// away, and waits for calls in flight to be answered; after `grace`, closes whatever
    /// is left. Returns once every connection is closed.
    pub async fn shutdown(mut self, grace: Duration) -> Shutdown {
        let deadline = stop::grace_deadline(grace);
        tracing::info!(addr = %self.local_addr, ?grace, "shutting down");
        self.serving.stop();
        self.deregister_all(deadline).await;
        let outcome = self.stopper.drain(&self.runtime, deadline).await;
        match outcome {
            Shutdown::Graceful => tracing::info!(addr = %self.local_addr, "shut down"),
            Shutdown::Forced => tracing::warn!(
                addr = %self.local_addr,
                "shut down: connections still open at the end of the grace period were closed"
            ),
        }
        outcome
    }

    /// Closes every connection at once, answering nothing more. Registrations stop being
    /// kept up but are not withdrawn: the registry expires them (TTL, lease).
    pub async fn abort(self) {
        self.serving.stop();
        for registration in &self.registrations {
            registration.upkeep.abort();
        }
        self.stopper.abort().await;
    }
}

struct AcceptLoop<R: Runtime> {
    runtime: R,
    listener: R::Listener,
    served: Arc<Served>,
    config: ServerConfig,
    signals: Signals,
    active: Arc<AtomicUsize>,
    /// The connections, for eviction at the limit and the per-IP cap.
    idle: Arc<idle::IdleTable>,
    keep_open: (async_channel::Sender<()>, async_channel::Sender<()>),
    alive: async_channel::Sender<()>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ServerConfig>>,
    #[cfg(feature = "http")]
    http: Option<Arc<crate::http::HttpShared>>,
}

/// Counts a connection for `max_connections`, and in the connections gauge, while it
/// lives.
struct ActiveGuard {
    active: Arc<AtomicUsize>,
    _gauge: ConnectionGauge,
}

impl ActiveGuard {
    fn new(active: &Arc<AtomicUsize>) -> Self {
        ActiveGuard {
            active: active.clone(),
            _gauge: ConnectionGauge::new(Side::Server),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<R: Runtime> AcceptLoop<R> {
    /// Whether a connection from `peer` is served: its place in the idle table, or why it
    /// is refused. At the connection limit, the longest-idle connection is asked to go to
    /// make room; only when none is idle is the new one refused.
    fn admit(&self, peer: SocketAddr, over_limit: bool) -> (Option<idle::Tracked>, Option<Status>) {
        let per_ip = || {
            let status = Status::new(
                Code::ResourceExhausted,
                format!("too many connections from {}", peer.ip()),
            );
            (None, Some(status))
        };
        let cap = self.config.max_connections_per_ip;
        if !self.idle.has_room(peer.ip(), cap) {
            return per_ip();
        }
        // Before the newcomer joins the table, so that it is not the one picked.
        if over_limit && !self.idle.evict_longest_idle() {
            return (None, Some(at_limit()));
        }
        match self.idle.track(peer.ip(), cap) {
            Some(tracked) => (Some(tracked), None),
            None => per_ip(),
        }
    }

    async fn run(self) {
        let mut drain = stop::SignalRx::new(&self.signals.drain);
        let mut draining = false;
        // Once draining, the connections the kernel already completed are still taken (and
        // told to go): closing the port under them would reset them, and their clients could
        // not tell whether their calls were served. At most a backlog's worth.
        let mut backlog = self.config.listen_backlog as usize;
        loop {
            let accepted = std::future::poll_fn(|cx| {
                draining = draining || drain.poll_given(cx);
                if !draining {
                    return self.listener.poll_accept(cx).map(Some);
                }
                if backlog == 0 {
                    return Poll::Ready(None);
                }
                Poll::Ready(match self.listener.poll_accept(cx) {
                    Poll::Ready(accepted) => Some(accepted),
                    Poll::Pending => self.listener.accept_ready().transpose(),
                })
            })
            .await;
            let (io, peer) = match accepted {
                None => break, // drained: stop accepting and release the port
                Some(Ok(accepted)) if draining => {
                    backlog -= 1;
                    accepted
                }
                Some(Ok(accepted)) => accepted,
                Some(Err(_)) if draining => break,
                Some(Err(e)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    let later = Instant::now() + Duration::from_millis(50);
                    self.runtime.sleep_until(later).await;
                    continue;
                }
            };
            let guard = ActiveGuard::new(&self.active);
            let over_limit =
                self.active.fetch_add(1, Ordering::Relaxed) >= self.config.max_connections;
            let (tracked, refusal) = self.admit(peer, over_limit);
            let mut signals = self.signals.clone();
            if let Some(tracked) = &tracked {
                signals.idle = tracked.slot.clone();
                signals.idle_timeout = self.config.idle_timeout;
            }
            let guard = (guard, tracked);
            let alive = self.alive.clone();
            #[cfg(feature = "tls")]
            if let Some(tls) = &self.tls {
                let (runtime, config, served) =
                    (self.runtime.clone(), self.config.conn, self.served.clone());
                let tls = tls.clone();
                #[cfg(feature = "http")]
                let http = self.http.clone();
                self.runtime.spawn(async move {
                    let Some(io) = tls_accept(&runtime, io, peer, tls, &signals).await else {
                        return;
                    };
                    #[cfg(feature = "http")]
                    if let Some(http) = http {
                        let accepted = crate::http::Accepted {
                            runtime,
                            io,
                            peer,
                            config,
                            served,
                            signals,
                            refusal,
                        };
                        crate::http::serve_sniffed(accepted, http).await;
                        drop((guard, alive));
                        return;
                    }
                    let mut conn =
                        ServerConnection::new(runtime, io, peer, config, served, signals);
                    if let Some(status) = refusal {
                        conn.refuse(status);
                    }
                    conn.await;
                    drop(guard);
                    drop(alive);
                });
                continue;
            }
            #[cfg(feature = "http")]
            if let Some(http) = &self.http {
                let accepted = crate::http::Accepted {
                    runtime: self.runtime.clone(),
                    io,
                    peer,
                    config: self.config.conn,
                    served: self.served.clone(),
                    signals,
                    refusal,
                };
                let http = http.clone();
                self.runtime.spawn(async move {
                    crate::http::serve_sniffed(accepted, http).await;
                    drop((guard, alive));
                });
                continue;
            }
            let mut conn = ServerConnection::new(
                self.runtime.clone(),
                io,
                peer,
                self.config.conn,
                self.served.clone(),
                signals,
            );
            if let Some(status) = refusal {
                conn.refuse(status);
            }
            self.runtime.spawn(async move {
                conn.await;
                drop(guard);
                drop(alive);
            });
        }
        drop(self.keep_open);
    }
}

/// A TLS config that offers HTTP's ALPN protocols (`h2` with gRPC, `http/1.1`) when the
/// server answers HTTP and the config names none, so that gRPC clients, which require `h2`,
/// and browsers pick their protocol in the handshake. A binary-protocol client offers no
/// ALPN and is told apart by its first bytes, as over plain TCP.
#[cfg(all(feature = "tls", feature = "http"))]
fn offer_alpn(config: Arc<rustls::ServerConfig>, http: bool) -> Arc<rustls::ServerConfig> {
    if !http || !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut config = (*config).clone();
    #[cfg(feature = "grpc")]
    config.alpn_protocols.push(b"h2".to_vec());
    config.alpn_protocols.push(b"http/1.1".to_vec());
    Arc::new(config)
}

fn at_limit() -> Status {
    Status::new(Code::ResourceExhausted, "server is at its connection limit")
}

/// Completes the TLS handshake of an accepted connection, within a time limit and unless
/// the server is aborted first. A failure is logged and closes this connection only.
#[cfg(feature = "tls")]
async fn tls_accept<R: Runtime>(
    runtime: &R,
    io: R::Io,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    signals: &Signals,
) -> Option<crate::tls::TlsIo<R::Io>> {
    let mut io = match crate::tls::TlsIo::server(io, config) {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS session not created");
            return None;
        }
    };
    let mut abort = stop::SignalRx::new(&signals.abort);
    let handshake = std::future::poll_fn(|cx| {
        if abort.poll_given(cx) {
            return Poll::Ready(Err(io::Error::other("server shut down")));
        }
        io.poll_handshake(cx)
    });
    let deadline = Instant::now() + TLS_HANDSHAKE_TIMEOUT;
    match timeout(runtime, deadline, handshake).await {
        Some(Ok(())) => Some(io),
        Some(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            // Sends the alert the session queued, if the socket takes it.
            let _ =
                std::future::poll_fn(|cx| Poll::Ready(crate::runtime::Io::poll_flush(&mut io, cx)))
                    .await;
            None
        }
        None => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
