//! [`ClientBuilder`]: what a client calls (a discovered service or one address), how it
//! balances, and its interceptors.

use std::net::SocketAddr;
use std::sync::Arc;

use gorpc_proto::balance::{Balancer, PowerOfTwoChoices};
use gorpc_proto::{Code, Status};

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
/// ```ignore
/// let client = Client::builder(runtime)
///     .discover(consul, "greeter")
///     .balance(RoundRobin::new())
///     .build()?;
/// ```
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

    /// Pool (per instance), connection and timeout settings.
    pub fn config(mut self, config: ClientConfig) -> Self {
        self.config = config;
        self
    }

    /// The protocol the instances are called in: gorpc's binary protocol (the default), or
    /// gRPC (feature `grpc`), for instances that are gRPC servers of any kind.
    pub fn protocol(mut self, protocol: InstanceProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn outlier_detection(mut self, outlier: OutlierDetection) -> Self {
        self.outlier = outlier;
        self
    }

    pub fn interceptor(mut self, interceptor: impl ClientInterceptor) -> Self {
        self.interceptors.push(Arc::new(interceptor));
        self
    }

    /// The client. Discovery starts now, in the background; calls made before it first
    /// answers wait for it, within their deadline.
    pub fn build(self) -> Result<Client, Status> {
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
        Ok(Client {
            route,
            default_timeout: self.config.default_timeout,
            interceptors: self.interceptors.into(),
        })
    }
}
