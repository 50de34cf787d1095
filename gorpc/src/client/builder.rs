//! [`ClientBuilder`]: what a client calls (a discovered service or one address), how it
//! balances, its interceptors, and its connections' settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gorpc_proto::balance::{Balancer, PowerOfTwoChoices};
use gorpc_proto::{Code, KeepaliveConfig, Limits, Status};

use super::balanced::{Balanced, InstanceProtocol, OutlierDetection};
use super::pool::EndpointPool;
use super::{Client, ClientConfig, Route};
use crate::discovery::Discover;
use crate::interceptor::ClientInterceptor;
use crate::runtime::Runtime;

enum Target {
    None,
    Endpoint(SocketAddr),
    Service(Arc<dyn Discover>, String),
}

/// Builds a [`Client`]:
///
/// ```no_run
/// # use std::net::SocketAddr;
/// # use gorpc::discovery::Discover;
/// # async fn demo<R: gorpc::Runtime>(
/// #     runtime: R,
/// #     consul: impl Discover,
/// #     addr: SocketAddr,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use gorpc::proto::balance::RoundRobin;
/// use gorpc::Client;
///
/// let client = Client::builder(runtime.clone())
///     .discover(consul, "greeter")
///     .balance(RoundRobin::new(7)) // the seed picks where the rotation starts
///     .build()?;
///
/// let client = Client::builder(runtime)
///     .endpoint(addr)
///     .timeout(Duration::from_secs(2))
///     .pool_size(4)
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
///
/// The settings ([`timeout`](Self::timeout), [`pool_size`](Self::pool_size),
/// [`limits`](Self::limits)...) each change one field of the [`ClientConfig`] that
/// [`config`](Self::config) sets whole, so call `config` first if you use both.
pub struct ClientBuilder<R: Runtime> {
    runtime: R,
    target: Target,
    balancer: Option<Box<dyn Balancer + Send>>,
    config: ClientConfig,
    outlier: OutlierDetection,
    protocol: InstanceProtocol,
    interceptors: Vec<Arc<dyn ClientInterceptor>>,
}

impl<R: Runtime> std::fmt::Debug for ClientBuilder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("config", &self.config)
            .field("outlier", &self.outlier)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> ClientBuilder<R> {
    pub(crate) fn new(runtime: R) -> Self {
        ClientBuilder {
            runtime,
            target: Target::None,
            balancer: None,
            config: ClientConfig::default(),
            outlier: OutlierDetection::default(),
            protocol: InstanceProtocol::default(),
            interceptors: Vec::new(),
        }
    }

    /// Calls the instances of `service` that `discover` reports, following its changes.
    pub fn discover(mut self, discover: impl Discover, service: &str) -> Self {
        self.target = Target::Service(Arc::new(discover), service.to_owned());
        self
    }

    /// Calls one address.
    pub fn endpoint(mut self, addr: SocketAddr) -> Self {
        self.target = Target::Endpoint(addr);
        self
    }

    /// How calls spread over the instances. Default: power of two choices on in-flight
    /// calls and latency, which steers away from slow instances.
    pub fn balance(mut self, balancer: impl Balancer + Send + 'static) -> Self {
        self.balancer = Some(Box::new(balancer));
        self
    }

    /// Pool (per instance), connection and timeout settings, all of them: it replaces what
    /// the settings below set before it.
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// The timeout of unary calls that set none ([`ClientConfig::default_timeout`], 30 s
    /// unless set). Streams have none unless the call sets one.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.config.default_timeout = Some(timeout);
        self
    }

    /// Ends a stream whose receiver waits longer than `timeout` for the server's next
    /// message ([`ClientConfig::stream_idle_timeout`]).
    pub fn stream_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.stream_idle_timeout = Some(timeout);
        self
    }

    /// How long a connect (TCP and TLS handshake together) may take
    /// ([`ConnectionConfig::connect_timeout`](super::ConnectionConfig::connect_timeout)).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.pool.connection.connect_timeout = timeout;
        self
    }

    /// Liveness probing of quiet connections.
    pub fn keepalive(mut self, keepalive: KeepaliveConfig) -> Self {
        self.config.pool.connection.conn.keepalive = keepalive;
        self
    }

    /// The receive window of each stream call, in bytes
    /// ([`ConnConfig::stream_window`](gorpc_proto::ConnConfig::stream_window)).
    pub fn stream_window(mut self, bytes: u32) -> Self {
        self.config.pool.connection.conn.stream_window = bytes;
        self
    }

    /// The receive window of a connection's stream calls together, in bytes
    /// ([`ConnConfig::connection_window`](gorpc_proto::ConnConfig::connection_window)).
    pub fn connection_window(mut self, bytes: u32) -> Self {
        self.config.pool.connection.conn.connection_window = bytes;
        self
    }

    /// Connections kept to each endpoint (at least one); calls spread over them.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.config.pool.size = size;
        self
    }

    /// Bounds on frames, heads and calls in flight per connection. A call whose frame
    /// would pass `max_frame_len` is refused here, with `ResourceExhausted`.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.config.pool.connection.conn.limits = limits;
        self
    }

    /// Speak TLS to the server (plain TCP otherwise).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.config.pool.connection.tls = Some(tls);
        self
    }

    /// The protocol the instances are called in: gorpc's binary protocol (the default), or
    /// gRPC (feature `grpc`), for instances that are gRPC servers of any kind.
    pub fn protocol(mut self, protocol: InstanceProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// When a failing instance leaves the rotation, and for how long
    /// (default: [`OutlierDetection::default`]).
    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = outlier;
        self
    }

    /// Adds an interceptor around every call; interceptors run in the order added.
    pub fn interceptor(mut self, interceptor: impl ClientInterceptor) -> Self {
        self.interceptors.push(Arc::new(interceptor));
        self
    }

    /// The client of an [`endpoint`](Self::endpoint), connected before this returns (as
    /// [`Client::connect`]), so that a bad address or a refused handshake fails here. A
    /// client of a discovered service, or of a gRPC endpoint, is [`build`](Self::build)'s:
    /// it connects on its first calls.
    pub async fn connect(self) -> Result<Client, Status> {
        if let (Target::Endpoint(addr), InstanceProtocol::Binary) = (&self.target, self.protocol) {
            let pool = EndpointPool::new(self.runtime.clone(), *addr, self.config.pool.clone());
            pool.warm_up().await?;
            let route = Route::Pool(Arc::new(pool));
            return Ok(Client::assembled(
                self.runtime,
                route,
                &self.config,
                self.interceptors,
            ));
        }
        self.build()
    }

    /// The client. Discovery starts now, in the background; calls made before it first
    /// answers wait for it, within their deadline.
    pub fn build(self) -> Result<Client, Status> {
        let runtime = self.runtime.clone();
        let config = self.config.clone();
        let route = match self.target {
            Target::None => return Err(Status::new(
                Code::InvalidArgument,
                "client has nothing to call: set .discover(registry, service) or .endpoint(addr)",
            )),
            Target::Endpoint(addr) => match self.protocol {
                InstanceProtocol::Binary => Route::Pool(Arc::new(EndpointPool::new(
                    self.runtime,
                    addr,
                    self.config.pool,
                ))),
                #[cfg(feature = "grpc")]
                InstanceProtocol::Grpc => Route::Channel(Arc::new(crate::grpc::GrpcChannel::new(
                    self.runtime,
                    addr,
                    self.config.pool.connection,
                ))),
            },
            Target::Service(_, service) if service.trim().is_empty() => {
                return Err(Status::new(
                    Code::InvalidArgument,
                    "client's service name is empty",
                ))
            }
            Target::Service(discover, service) => {
                let balancer = self
                    .balancer
                    .unwrap_or_else(|| Box::new(PowerOfTwoChoices::new(fastrand::u64(..))));
                Route::Balanced(Balanced::start(
                    self.runtime,
                    discover,
                    service,
                    balancer,
                    self.config.pool,
                    self.outlier,
                    self.protocol,
                ))
            }
        };
        Ok(Client::assembled(
            runtime,
            route,
            &config,
            self.interceptors,
        ))
    }
}
