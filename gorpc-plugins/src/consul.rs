//! Consul as a service registry, through the local agent's HTTP API.
//!
//! [`Consul`] implements both halves of [`gorpc::discovery`]:
//!
//! - [`Register`]: `PUT /v1/agent/service/register` with an ID of `<service>-<ip>-<port>`, the
//!   instance's address, port and weight (`Weights.Passing`), and a TTL check (id
//!   `service:<id>`) that starts passing. The returned upkeep passes the check every third of
//!   the TTL and registers the instance again if the agent has forgotten it (an agent restart,
//!   or `DeregisterCriticalServiceAfter` having reaped it); deregistering stops the upkeep
//!   first, so a deregistered instance never comes back.
//! - [`Discover`]: `GET /v1/health/service/<name>?passing=true` as a blocking query on
//!   `X-Consul-Index`, each answer diffed against the last one. An agent that cannot be reached
//!   or answers with an error gives an `Unavailable` item naming its URL, and the watch tries
//!   again after a capped exponential backoff. Queries start at least
//!   [`MIN_QUERY_SPACING`] apart, so even an agent that stops blocking cannot make it spin.
//!
//! The HTTP calls go through `consulrs`, which runs on reqwest and therefore needs a tokio
//! context; every future here is wrapped in `async_compat::Compat`, which provides one (its
//! own background runtime when the caller is not on tokio), so the plugin works unchanged on
//! gorpc-tokio, gorpc-smol and async-std. consulrs reads TLS settings for `https://` agents
//! from `CONSUL_CACERT`, `CONSUL_CAPATH`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY` and
//! `CONSUL_HTTP_SSL_VERIFY`, and logs each request at `info` under the `consulrs` and
//! `rustify` targets (filter them with `consulrs=warn,rustify=warn`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_compat::Compat;
use consulrs::api::check::common::AgentServiceCheck;
use consulrs::api::check::requests::TtlCheckPassRequest;
use consulrs::api::features::{Blocking, FeaturedEndpoint, Features};
use consulrs::api::service::common::AgentWeights;
use consulrs::api::service::requests::{DeregisterServiceRequest, RegisterServiceRequest};
use consulrs::client::{ConsulClient, ConsulClientSettingsBuilder};
use consulrs::error::ClientError;
use futures::future::BoxFuture;
use futures::lock::Mutex;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use gorpc::discovery::{diff, Discover, Instance, Register, Registered, Registration, WatchEvent};
use gorpc::{Code, Status};
use rustify::enums::{RequestMethod, RequestType, ResponseType};
use serde::Deserialize;

/// The least time between the starts of two health queries of one watch. Bounds the query
/// rate when the agent answers at once every time (a changing index under heavy churn, an
/// index that keeps going backwards), as Consul's blocking-query docs ask of clients.
pub const MIN_QUERY_SPACING: Duration = Duration::from_millis(100);

/// Settings of a [`Consul`] registry. `Default` gives Consul's own usual values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulOptions {
    /// ACL token, sent as `X-Consul-Token`. Default: none (`CONSUL_HTTP_TOKEN` is not read).
    pub token: Option<String>,
    /// TTL of a registered instance's check; the upkeep passes it every `ttl / 3`.
    /// Default 10 s.
    pub ttl: Duration,
    /// How long an instance's check may stay critical (its server gone without
    /// deregistering) before the agent removes the instance. Consul enforces at least one
    /// minute. `None`: never. Default: one minute.
    pub deregister_critical_after: Option<Duration>,
    /// Longest a blocking health query waits for a change (Consul adds up to 1/16 of jitter
    /// and caps it at 10 minutes). Default 60 s.
    pub wait: Duration,
    /// Limit on every call that is not a blocking query (register, pass, deregister), and the
    /// margin a blocking query gets beyond `wait`. Default 10 s.
    pub request_timeout: Duration,
    /// First pause of a watch after a failed query; it doubles per failure up to
    /// `retry_max`, with jitter. Default 250 ms.
    pub retry_min: Duration,
    /// Longest pause between a watch's attempts while the agent fails. Default 10 s.
    pub retry_max: Duration,
}

impl Default for ConsulOptions {
    fn default() -> Self {
        ConsulOptions {
            token: None,
            ttl: Duration::from_secs(10),
            deregister_critical_after: Some(Duration::from_secs(60)),
            wait: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Why a [`Consul`] registry could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsulError {
    /// The agent URL is not of the form `http://host:port` (or `https://`).
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The ACL token cannot be sent as an HTTP header value.
    InvalidToken,
    /// An option is out of range.
    InvalidOption {
        /// The option's name, as in [`ConsulOptions`].
        option: &'static str,
        /// The range it must lie in.
        reason: String,
    },
    /// consulrs could not set up its HTTP client (TLS files from the environment, mostly).
    Client {
        /// The agent URL.
        url: String,
        /// consulrs's error.
        reason: String,
    },
}

impl fmt::Display for ConsulError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsulError::InvalidUrl { url, reason } => {
                write!(f, "consul agent URL {url:?} is invalid: {reason}")
            }
            ConsulError::InvalidToken => {
                f.write_str("consul ACL token is not a valid HTTP header value")
            }
            ConsulError::InvalidOption { option, reason } => {
                write!(f, "consul option {option}: {reason}")
            }
            ConsulError::Client { url, reason } => {
                write!(f, "consul client for {url} could not be built: {reason}")
            }
        }
    }
}

impl std::error::Error for ConsulError {}

impl From<ConsulError> for Status {
    fn from(err: ConsulError) -> Status {
        Status::new(Code::InvalidArgument, err.to_string())
    }
}

/// A Consul agent as a service registry; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct Consul {
    inner: Arc<Agent>,
}

impl fmt::Debug for Consul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consul")
            .field("url", &self.inner.url)
            .field("ttl", &self.inner.options.ttl)
            .field("wait", &self.inner.options.wait)
            .finish_non_exhaustive()
    }
}

impl Consul {
    /// The agent at `url` (e.g. `http://127.0.0.1:8500`) with default options.
    pub fn new(url: &str) -> Result<Self, ConsulError> {
        Self::with_options(url, ConsulOptions::default())
    }

    /// The agent at `url` with `options`. Checks the URL, token and options now; nothing is
    /// sent until the first registration or watch.
    pub fn with_options(url: &str, options: ConsulOptions) -> Result<Self, ConsulError> {
        let url = normalize_url(url)?;
        validate_options(&options)?;
        let mut settings = ConsulClientSettingsBuilder::default()
            .address(url.clone())
            .build()
            .map_err(|e| ConsulError::Client {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        // The token comes from the options only: consulrs would otherwise take
        // CONSUL_HTTP_TOKEN from the environment, unchecked.
        settings.token = options.token.clone();
        let client = ConsulClient::new(settings).map_err(|e| ConsulError::Client {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        Ok(Consul {
            inner: Arc::new(Agent {
                client,
                url,
                options,
            }),
        })
    }

    /// The agent's base URL, as requests are sent to it.
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The options it was built with.
    pub fn options(&self) -> &ConsulOptions {
        &self.inner.options
    }
}

/// Accepts `http(s)://host[:port][/]` and returns it without the trailing slash. consulrs
/// puts `/v1` at the start of the path, so a path prefix would be misplaced: refuse it.
fn normalize_url(raw: &str) -> Result<String, ConsulError> {
    let invalid = |reason: &str| ConsulError::InvalidUrl {
        url: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(raw.trim()).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("the scheme must be http or https"));
    }
    let Some(host) = parsed.host_str() else {
        return Err(invalid("it has no host"));
    };
    if parsed.path() != "/" {
        return Err(invalid(
            "it must not have a path (the agent's API is under /v1)",
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("it must not have a query or fragment"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid("credentials go in the ACL token, not the URL"));
    }
    Ok(match parsed.port() {
        Some(port) => format!("{}://{host}:{port}", parsed.scheme()),
        None => format!("{}://{host}", parsed.scheme()),
    })
}

fn validate_options(options: &ConsulOptions) -> Result<(), ConsulError> {
    let out_of_range = |option, reason: &str| ConsulError::InvalidOption {
        option,
        reason: reason.to_owned(),
    };
    if let Some(token) = &options.token {
        // consulrs would panic on a token that is not a valid header value.
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConsulError::InvalidToken);
        }
    }
    if options.ttl < Duration::from_millis(10) {
        return Err(out_of_range("ttl", "must be at least 10 ms"));
    }
    if options.wait < Duration::from_millis(1) || options.wait > Duration::from_secs(600) {
        return Err(out_of_range(
            "wait",
            "must be between 1 ms and 10 minutes (Consul's limit)",
        ));
    }
    if options.request_timeout.is_zero() {
        return Err(out_of_range("request_timeout", "must not be zero"));
    }
    if options.retry_min.is_zero() || options.retry_max < options.retry_min {
        return Err(out_of_range(
            "retry_min/retry_max",
            "need 0 < retry_min <= retry_max",
        ));
    }
    Ok(())
}

/// A service name as it goes into a URL path. consulrs re-encodes path segments when it adds
/// `/v1`, which would corrupt escaped characters, so only unreserved ones are accepted
/// (Consul itself recommends DNS-compatible names).
fn validate_service(service: &str) -> Result<(), Status> {
    if service.is_empty() {
        return Err(Status::new(
            Code::InvalidArgument,
            "consul: the service name is empty",
        ));
    }
    if let Some(bad) = service
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')))
    {
        return Err(Status::new(
            Code::InvalidArgument,
            format!(
                "consul: service name {service:?} has {bad:?}; use letters, digits, '-', '_', '.' or '~'"
            ),
        ));
    }
    Ok(())
}

/// A duration as Go's `time.ParseDuration` (which Consul uses) reads it.
fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis().max(1))
    }
}

/// An error and its sources, joined: consulrs's own messages say only which step failed.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// One agent and how to talk to it; shared by every watch and registration made from one
/// [`Consul`].
struct Agent {
    client: ConsulClient,
    /// `scheme://host:port`, for requests and error messages.
    url: String,
    options: ConsulOptions,
}

/// Why a call to the agent failed.
enum AgentError {
    /// The agent answered with an HTTP error status (it is up, but refused).
    Refused { status: u16, body: String },
    /// No answer: connection refused or reset, timeout, unreadable response.
    Unreachable(String),
}

impl AgentError {
    fn from_client(err: ClientError) -> Self {
        match err {
            ClientError::APIError { code, message } => AgentError::Refused {
                status: code,
                body: message.unwrap_or_default().trim().to_owned(),
            },
            other => AgentError::Unreachable(error_chain(&other)),
        }
    }

    /// As a status for a caller: `what` names the call, the agent's URL is always there.
    fn into_status(self, url: &str, what: &str) -> Status {
        let message = match self {
            AgentError::Refused { status, body } => {
                format!("consul agent {url}: {what}: HTTP {status}: {body}")
            }
            AgentError::Unreachable(reason) => {
                format!("consul agent {url} unreachable: {what}: {reason}")
            }
        };
        Status::new(Code::Unavailable, message)
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Refused { status, body } => write!(f, "HTTP {status}: {body}"),
            AgentError::Unreachable(reason) => f.write_str(reason),
        }
    }
}

/// `call`, unless it takes longer than `limit`. Runs inside `Compat`, so tokio's timer is
/// there whatever the caller's runtime.
async fn within<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(AgentError::from_client),
        Err(_) => Err(AgentError::Unreachable(format!(
            "no answer within {limit:?}"
        ))),
    }
}

/// The instance a registration keeps announced.
struct AgentService {
    id: String,
    check_id: String,
    service: String,
    addr: SocketAddr,
    weight: u32,
}

impl Agent {
    async fn register_service(&self, svc: &AgentService) -> Result<(), AgentError> {
        let check = AgentServiceCheck {
            check_id: Some(svc.check_id.clone()),
            name: Some(format!("gorpc TTL check of {}", svc.id)),
            ttl: Some(go_duration(self.options.ttl)),
            // Passing from the start, so the instance is found as soon as register returns
            // (a TTL check starts critical otherwise).
            status: Some("passing".to_owned()),
            deregister_critical_service_after: self
                .options
                .deregister_critical_after
                .map(go_duration),
            ..AgentServiceCheck::default()
        };
        let request = RegisterServiceRequest {
            id: Some(svc.id.clone()),
            name: Some(svc.service.clone()),
            address: Some(svc.addr.ip().to_string()),
            port: Some(u64::from(svc.addr.port())),
            weights: Some(AgentWeights {
                passing: Some(u64::from(svc.weight)),
                warning: Some(1),
            }),
            check: Some(check),
            ..RegisterServiceRequest::default()
        };
        within(
            self.options.request_timeout,
            consulrs::api::exec_with_empty(&self.client, request),
        )
        .await
        .map(drop)
    }

    async fn pass_check(&self, check_id: &str, limit: Duration) -> Result<(), AgentError> {
        let request = TtlCheckPassRequest {
            check: check_id.to_owned(),
            ..TtlCheckPassRequest::default()
        };
        within(limit, consulrs::api::exec_with_empty(&self.client, request))
            .await
            .map(drop)
    }

    async fn deregister_service(&self, id: &str) -> Result<(), AgentError> {
        let request = DeregisterServiceRequest {
            id: id.to_owned(),
            ..DeregisterServiceRequest::default()
        };
        within(
            self.options.request_timeout,
            consulrs::api::exec_with_empty(&self.client, request),
        )
        .await
        .map(drop)
    }

    /// One health query: the passing entries of `service` and the `X-Consul-Index` they are
    /// at. `index` 0 answers at once; above 0 the agent holds the query until the index
    /// passes it or `wait` runs out.
    async fn passing_entries(
        &self,
        service: &str,
        index: u64,
    ) -> Result<(Vec<ServiceEntry>, Option<u64>), AgentError> {
        let blocking = index > 0;
        let request = HealthServiceRequest {
            service: service.to_owned(),
            features: blocking.then(|| Features {
                blocking: Some(Blocking {
                    index,
                    wait: Some(go_duration(self.options.wait)),
                }),
                ..Features::default()
            }),
        };
        let limit = if blocking {
            // Consul may add up to wait/16 of jitter.
            self.options.wait + self.options.wait / 16 + self.options.request_timeout
        } else {
            self.options.request_timeout
        };
        let answer = within(
            limit,
            consulrs::api::exec_with_result(&self.client, request),
        )
        .await?;
        let index = answer.index.as_deref().and_then(|i| i.trim().parse().ok());
        Ok((answer.response, index))
    }
}

/// `GET /v1/health/service/<service>?passing=true`, which consulrs 0.1 lacks; executed
/// through consulrs all the same, for its token, `/v1` prefix, blocking parameters and
/// `X-Consul-Index`.
struct HealthServiceRequest {
    service: String,
    features: Option<Features>,
}

impl rustify::Endpoint for HealthServiceRequest {
    type Response = Vec<ServiceEntry>;
    const REQUEST_BODY_TYPE: RequestType = RequestType::JSON;
    const RESPONSE_BODY_TYPE: ResponseType = ResponseType::JSON;

    fn path(&self) -> String {
        format!("health/service/{}", self.service)
    }

    fn method(&self) -> RequestMethod {
        RequestMethod::GET
    }

    fn query(&self) -> Result<Option<String>, rustify::errors::ClientError> {
        Ok(Some("passing=true".to_owned()))
    }
}

impl FeaturedEndpoint for HealthServiceRequest {
    fn features(&self) -> Option<Features> {
        self.features.clone()
    }
}

/// One element of the health endpoint's answer, reduced to what discovery reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry {
    node: EntryNode,
    service: EntryService,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryNode {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryService {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    weights: Option<EntryWeights>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EntryWeights {
    passing: u32,
}

impl ServiceEntry {
    /// The instance this entry announces: the service's address, or its node's when the
    /// service has none (Consul's convention). Only IP literals: a host name would need a
    /// resolver, so such an entry is skipped with a warning.
    fn instance(&self, service: &str) -> Option<Instance> {
        let host = if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        };
        let Ok(ip) = host.parse::<IpAddr>() else {
            tracing::warn!(
                service,
                id = %self.service.id,
                address = %host,
                "consul: skipping an instance whose address is not an IP address"
            );
            return None;
        };
        let weight = self.service.weights.as_ref().map_or(1, |w| w.passing);
        Some(Instance::new(SocketAddr::new(ip, self.service.port)).with_weight(weight))
    }
}

impl Discover for Consul {
    fn watch(&self, service: &str) -> BoxStream<'static, WatchEvent> {
        if let Err(invalid) = validate_service(service) {
            // Retrying cannot fix the name: say so once and end.
            return futures::stream::once(async move { Err(invalid) }).boxed();
        }
        let watch = HealthWatch {
            agent: self.inner.clone(),
            service: service.to_owned(),
            index: 0,
            known: Vec::new(),
            delivered_first: false,
            failures: 0,
            last_query: None,
        };
        futures::stream::unfold(watch, |mut watch| {
            Compat::new(async move {
                let event = watch.next_event().await;
                Some((event, watch))
            })
        })
        .boxed()
    }
}

/// The state of one service's watch between two events.
struct HealthWatch {
    agent: Arc<Agent>,
    service: String,
    /// The `X-Consul-Index` to block on; 0 asks for an answer at once.
    index: u64,
    /// The instances the consumer has been told about.
    known: Vec<Instance>,
    delivered_first: bool,
    /// Failed queries in a row, for the backoff.
    failures: u32,
    last_query: Option<Instant>,
}

impl HealthWatch {
    async fn next_event(&mut self) -> WatchEvent {
        loop {
            self.pace().await;
            self.last_query = Some(Instant::now());
            let (entries, index) = match self.agent.passing_entries(&self.service, self.index).await
            {
                Ok(answer) => answer,
                Err(err) => {
                    self.failures = self.failures.saturating_add(1);
                    let what = format!("GET /v1/health/service/{}", self.service);
                    return Err(err.into_status(&self.agent.url, &what));
                }
            };
            self.failures = 0;
            self.index = next_index(self.index, index);
            let instances: Vec<Instance> = entries
                .iter()
                .filter_map(|entry| entry.instance(&self.service))
                .collect();
            let changes = diff(&self.known, &instances);
            self.known = instances;
            if !changes.is_empty() || !self.delivered_first {
                self.delivered_first = true;
                return Ok(changes);
            }
            // The wait ran out, or a write that did not change this answer: block again.
        }
    }

    /// Waits before the next query: the backoff after failures, and at least
    /// [`MIN_QUERY_SPACING`] since the last query started in any case.
    async fn pace(&self) {
        let Some(last) = self.last_query else { return };
        let mut pause = MIN_QUERY_SPACING;
        if self.failures > 0 {
            let options = &self.agent.options;
            let doubled = options
                .retry_min
                .saturating_mul(1 << self.failures.saturating_sub(1).min(16));
            let capped = doubled.min(options.retry_max);
            // Jitter in [1/2, 1] of the pause, so many clients do not retry in step.
            let jittered = capped.mul_f64(0.5 + fastrand::f64() * 0.5);
            pause = pause.max(jittered);
        }
        let until = last + pause;
        let now = Instant::now();
        if until > now {
            tokio::time::sleep(until - now).await;
        }
    }
}

/// The index to send next, given the one just sent and the one the agent answered with, as
/// Consul's blocking-query docs prescribe: an index that went backwards (a snapshot
/// restore, a reset of the agent's state) restarts the watch from 0, and an index of 0 or
/// none at all is used as 1, so the next query still blocks instead of returning at once.
fn next_index(sent: u64, answered: Option<u64>) -> u64 {
    match answered {
        Some(index) if index < sent => 0,
        Some(index) => index.max(1),
        None => 1,
    }
}

impl Register for Consul {
    fn register(
        &self,
        registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        let agent = self.inner.clone();
        let service = registration.service.clone();
        let weight = registration.weight;
        Compat::new(async move {
            validate_service(&service)?;
            if weight == 0 {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "consul: cannot register {service} with weight 0 (Consul's Weights.Passing must be at least 1)"
                    ),
                ));
            }
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(Status::new(
                    Code::InvalidArgument,
                    format!(
                        "consul: cannot register {service} at {addr}: clients cannot dial it; set Registration::with_addr"
                    ),
                ));
            }
            let id = format!("{service}-{}-{}", addr.ip(), addr.port());
            let instance = Arc::new(AgentService {
                check_id: format!("service:{id}"),
                id,
                service,
                addr,
                weight,
            });
            agent.register_service(&instance).await.map_err(|e| {
                e.into_status(
                    &agent.url,
                    &format!("registering {}", instance.id),
                )
            })?;
            tracing::debug!(id = %instance.id, url = %agent.url, "consul: registered");
            // Held by the upkeep around each beat and by deregister for good, so the upkeep
            // can never register the instance again once it is deregistered.
            let deregistered = Arc::new(Mutex::new(false));
            let upkeep = Compat::new(upkeep(
                agent.clone(),
                instance.clone(),
                deregistered.clone(),
            ))
            .boxed();
            let deregister = Box::new(move || {
                Compat::new(async move {
                    let mut done = deregistered.lock().await;
                    *done = true;
                    agent
                        .deregister_service(&instance.id)
                        .await
                        .map_err(|e| {
                            e.into_status(
                                &agent.url,
                                &format!("deregistering {}", instance.id),
                            )
                        })
                })
                .boxed()
            })
                as Box<dyn FnOnce() -> BoxFuture<'static, Result<(), Status>> + Send>;
            Ok(Registered { upkeep, deregister })
        })
        .boxed()
    }
}

/// Passes the instance's TTL check every third of the TTL until it is deregistered. Errors
/// are logged and the beat goes on; when the agent answers that it does not know the check,
/// the instance is registered again.
async fn upkeep(agent: Arc<Agent>, instance: Arc<AgentService>, deregistered: Arc<Mutex<bool>>) {
    let interval = agent.options.ttl / 3;
    let limit = interval.min(agent.options.request_timeout);
    loop {
        tokio::time::sleep(interval).await;
        let done = deregistered.lock().await;
        if *done {
            return;
        }
        match agent.pass_check(&instance.check_id, limit).await {
            Ok(()) => {}
            Err(AgentError::Refused { status, body }) => {
                tracing::warn!(
                    id = %instance.id, url = %agent.url, status, %body,
                    "consul: TTL check refused; registering the instance again"
                );
                if let Err(err) = agent.register_service(&instance).await {
                    tracing::warn!(id = %instance.id, url = %agent.url, %err, "consul: registering again failed");
                }
            }
            Err(err) => {
                tracing::warn!(id = %instance.id, url = %agent.url, %err, "consul: TTL check not passed");
            }
        }
        drop(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_are_checked_and_normalized() {
        assert_eq!(
            normalize_url("http://127.0.0.1:8500/").unwrap(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            normalize_url("https://consul.local").unwrap(),
            "https://consul.local"
        );
        for bad in [
            "127.0.0.1:8500",
            "http//x",
            "ftp://127.0.0.1:8500",
            "http://127.0.0.1:8500/consul",
            "http://127.0.0.1:8500/?dc=x",
            "http://user:pw@127.0.0.1:8500",
            "",
        ] {
            let err = normalize_url(bad).unwrap_err();
            assert!(
                matches!(err, ConsulError::InvalidUrl { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn options_and_tokens_are_checked() {
        let bad_token = ConsulOptions {
            token: Some("line\nbreak".into()),
            ..ConsulOptions::default()
        };
        assert_eq!(
            Consul::with_options("http://127.0.0.1:8500", bad_token).unwrap_err(),
            ConsulError::InvalidToken
        );
        let long_wait = ConsulOptions {
            wait: Duration::from_secs(601),
            ..ConsulOptions::default()
        };
        assert!(matches!(
            Consul::with_options("http://127.0.0.1:8500", long_wait).unwrap_err(),
            ConsulError::InvalidOption { option: "wait", .. }
        ));
    }

    #[test]
    fn service_names_must_be_plain() {
        assert!(validate_service("greeter.v1_x-2").is_ok());
        assert_eq!(
            validate_service("").unwrap_err().code(),
            Code::InvalidArgument
        );
        let err = validate_service("a/b").unwrap_err();
        assert!(err.message().contains("'/'"), "{err}");
    }

    #[test]
    fn durations_are_written_the_go_way() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_micros(10)), "1ms");
    }

    #[test]
    fn the_index_follows_consuls_rules() {
        assert_eq!(next_index(0, Some(7)), 7);
        assert_eq!(next_index(7, Some(9)), 9);
        assert_eq!(next_index(9, Some(9)), 9);
        // Backwards: start over with a query that answers at once.
        assert_eq!(next_index(9, Some(3)), 0);
        // Zero or missing would never block: use 1.
        assert_eq!(next_index(0, Some(0)), 1);
        assert_eq!(next_index(5, None), 1);
    }

    #[test]
    fn entries_use_the_node_address_when_the_service_has_none() {
        let json = r#"[
            {"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "a", "Service": "greeter", "Address": "", "Port": 7000},
             "Checks": []},
            {"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "b", "Service": "greeter", "Address": "10.0.0.2", "Port": 7001,
                         "Weights": {"Passing": 5, "Warning": 1}},
             "Checks": []},
            {"Node": {"Node": "n1", "Address": "10.0.0.1"},
             "Service": {"ID": "c", "Service": "greeter", "Address": "db.local", "Port": 7002},
             "Checks": []}
        ]"#;
        let entries: Vec<ServiceEntry> = serde_json::from_str(json).unwrap();
        let instances: Vec<Instance> = entries
            .iter()
            .filter_map(|e| e.instance("greeter"))
            .collect();
        assert_eq!(
            instances,
            vec![
                Instance::new("10.0.0.1:7000".parse().unwrap()),
                Instance::new("10.0.0.2:7001".parse().unwrap()).with_weight(5),
            ]
        );
    }
}
