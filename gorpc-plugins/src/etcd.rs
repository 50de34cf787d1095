//! etcd as a service registry: [`Etcd`] implements [`Discover`] and [`Register`].
//!
//! An instance of service `greeter` at `10.0.0.7:5000` is the key
//! `<prefix>/greeter/10.0.0.7:5000` (prefix `/gorpc/services` unless configured) with the
//! value `{"addr":"10.0.0.7:5000","weight":1}`, attached to a lease the registering server
//! keeps alive. When the server stops keeping it alive (it crashed, or was cut off) the lease
//! expires and etcd deletes the key; a graceful shutdown revokes the lease at once.
//!
//! A watch lists the service's keys, then watches them from the revision after that list.
//! When the watch breaks (etcd restarted, the history it needs was compacted) it yields an
//! `Unavailable` error, backs off, lists again and yields the difference, so a change made
//! while it was not watching is still reported.
//!
//! etcd-client runs on tokio. Every future and stream handed out here is wrapped with
//! `async-compat`, which polls it inside the caller's tokio runtime when there is one and
//! inside a small tokio runtime of its own otherwise, so the plugin works from gorpc-smol
//! (or any executor) as it does from gorpc-tokio.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_compat::Compat;
use etcd_client::{
    Client, ConnectOptions, Event, EventType, GetOptions, KeyValue, PutOptions, WatchOptions,
    WatchStream,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use gorpc::discovery::{diff, Change, Discover, Instance, Register, Registered, Registration};
use gorpc::{Code, Status};
use serde::{Deserialize, Serialize};

/// Where instances live unless [`Etcd::with_prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "/gorpc/services";
/// How long an instance outlives its server's last keep-alive, unless
/// [`Etcd::with_lease_ttl`] says otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First wait before retrying a failed watch or registration; doubled per failure up to
/// [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A configuration [`Etcd`] refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdConfigError {
    /// The endpoint list was empty.
    NoEndpoints,
    /// An endpoint is not `http://host:port` (or `host:port`).
    BadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The key prefix is empty, does not start with `/`, or is only slashes.
    BadPrefix {
        /// The prefix as given.
        prefix: String,
    },
    /// A lease TTL under one second (etcd counts leases in whole seconds).
    BadLeaseTtl(Duration),
}

impl fmt::Display for EtcdConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EtcdConfigError::NoEndpoints => write!(f, "etcd: no endpoints given"),
            EtcdConfigError::BadEndpoint { endpoint, reason } => {
                write!(f, "etcd: bad endpoint {endpoint:?}: {reason}")
            }
            EtcdConfigError::BadPrefix { prefix } => write!(
                f,
                "etcd: bad key prefix {prefix:?}: it must start with '/' and name something"
            ),
            EtcdConfigError::BadLeaseTtl(ttl) => {
                write!(f, "etcd: lease TTL {ttl:?} is under one second")
            }
        }
    }
}

impl std::error::Error for EtcdConfigError {}

impl From<EtcdConfigError> for Status {
    fn from(e: EtcdConfigError) -> Status {
        Status::new(Code::InvalidArgument, e.to_string())
    }
}

/// An etcd cluster used as a service registry. Cloning is cheap; each watch and each
/// registration opens its own connection.
#[derive(Clone, Debug)]
pub struct Etcd {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
struct Config {
    endpoints: Vec<String>,
    prefix: String,
    lease_ttl: Duration,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Etcd {
    /// A registry at `endpoints`, each `http://host:port` (a bare `host:port` means http).
    /// Nothing is dialled yet: an unreachable cluster shows up as `Unavailable` from the
    /// first watch or registration.
    pub fn new<I, E>(endpoints: I) -> Result<Self, EtcdConfigError>
    where
        I: IntoIterator<Item = E>,
        E: AsRef<str>,
    {
        let endpoints = endpoints
            .into_iter()
            .map(|e| normalize_endpoint(e.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        Ok(Etcd {
            config: Arc::new(Config {
                endpoints,
                prefix: DEFAULT_PREFIX.to_owned(),
                lease_ttl: DEFAULT_LEASE_TTL,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                request_timeout: DEFAULT_REQUEST_TIMEOUT,
            }),
        })
    }

    /// Keeps instances under `prefix` (a trailing `/` is dropped).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, EtcdConfigError> {
        let trimmed = prefix.trim_end_matches('/');
        if !prefix.starts_with('/') || trimmed.is_empty() {
            return Err(EtcdConfigError::BadPrefix {
                prefix: prefix.to_owned(),
            });
        }
        Arc::make_mut(&mut self.config).prefix = trimmed.to_owned();
        Ok(self)
    }

    /// How long a registration outlives its last keep-alive; rounded up to whole seconds.
    /// Keep-alives go out three times per TTL.
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Result<Self, EtcdConfigError> {
        if ttl < Duration::from_secs(1) {
            return Err(EtcdConfigError::BadLeaseTtl(ttl));
        }
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        Arc::make_mut(&mut self.config).lease_ttl = Duration::from_secs(secs);
        Ok(self)
    }

    /// How long to wait for a connection to an endpoint (default 3 s).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).connect_timeout = timeout;
        self
    }

    /// How long to wait for any one answer from etcd (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).request_timeout = timeout;
        self
    }

    /// The cluster's endpoints, each `http://host:port`.
    pub fn endpoints(&self) -> &[String] {
        &self.config.endpoints
    }

    /// The key prefix instances live under, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// How long a registration outlives its last keep-alive, in whole seconds.
    pub fn lease_ttl(&self) -> Duration {
        self.config.lease_ttl
    }

    /// The key an instance of `service` at `addr` is registered under.
    pub fn instance_key(&self, service: &str, addr: SocketAddr) -> String {
        self.config.instance_key(service, addr)
    }
}

impl Config {
    /// The common prefix of `service`'s keys; the trailing `/` keeps `greeter` from
    /// matching `greeter2`.
    fn service_prefix(&self, service: &str) -> String {
        format!("{}/{service}/", self.prefix)
    }

    fn instance_key(&self, service: &str, addr: SocketAddr) -> String {
        format!("{}{addr}", self.service_prefix(service))
    }

    fn unavailable(&self, what: &str, error: impl fmt::Display) -> Status {
        Status::new(
            Code::Unavailable,
            format!("etcd at {}: {what}: {error}", self.endpoints.join(",")),
        )
    }

    async fn connect(&self) -> Result<Client, Status> {
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings find a dead connection under an idle watch or keep-alive stream.
            .with_keep_alive(Duration::from_secs(10), self.request_timeout)
            .with_keep_alive_while_idle(true)
            // Without a leader etcd cannot serve a consistent watch; fail it so it re-lists.
            .with_require_leader(true);
        // The channel dials lazily, so this bounds only the setup; each request has its own
        // timeout below.
        self.timed("connect", Client::connect(&self.endpoints, Some(options)))
            .await
    }

    /// `request` with the request timeout, its error made an `Unavailable` status.
    async fn timed<T>(
        &self,
        what: &str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.unavailable(what, e)),
            Err(_) => Err(self.unavailable(
                what,
                format_args!("no answer within {:?}", self.request_timeout),
            )),
        }
    }
}

/// Accepts `http://host:port` or `host:port`; `https` needs TLS, which this plugin does not
/// configure.
fn normalize_endpoint(endpoint: &str) -> Result<String, EtcdConfigError> {
    let bad = |reason: &str| EtcdConfigError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let with_scheme = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let uri: http::Uri = with_scheme.parse().map_err(|e: http::uri::InvalidUri| {
        bad(&format!("not a URL ({e}); expected http://host:port"))
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("only http:// endpoints are supported"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| bad("no host; expected http://host:port"))?;
    if authority.host().is_empty() {
        return Err(bad("no host; expected http://host:port"));
    }
    if authority.port_u16().is_none() {
        return Err(bad("no port; expected http://host:port"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("a path or query has no meaning here"));
    }
    Ok(format!("http://{authority}"))
}

/// A service name becomes one path segment of a key.
fn check_service(service: &str) -> Result<(), Status> {
    let reason = if service.is_empty() {
        "is empty"
    } else if service.contains('/') {
        "contains '/'"
    } else if service.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "contains whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(Status::new(
        Code::InvalidArgument,
        format!("etcd: service name {service:?} {reason}"),
    ))
}

/// The value stored under an instance's key.
#[derive(Debug, Serialize, Deserialize)]
struct InstanceRecord {
    addr: SocketAddr,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// The instance a key-value pair describes, or `None` (logged) if its value is malformed:
/// one bad entry must not hide the others.
fn parse_instance(kv: &KeyValue) -> Option<Instance> {
    match serde_json::from_slice::<InstanceRecord>(kv.value()) {
        Ok(record) => Some(Instance::new(record.addr).with_weight(record.weight)),
        Err(e) => {
            tracing::warn!(
                key = %String::from_utf8_lossy(kv.key()),
                value = %String::from_utf8_lossy(kv.value()),
                "etcd: skipping malformed instance: {e}"
            );
            None
        }
    }
}

fn backoff(failures: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

impl Discover for Etcd {
    fn watch(&self, service: &str) -> BoxStream<'static, Result<Vec<Change>, Status>> {
        if let Err(status) = check_service(service) {
            // Retrying cannot fix the name: say why once and end.
            return futures::stream::once(async move { Err(status) }).boxed();
        }
        let watch = ServiceWatch {
            prefix: self.config.service_prefix(service),
            config: self.config.clone(),
            client: None,
            stream: None,
            watching_since: Instant::now(),
            known: HashMap::new(),
            listed: false,
            failures: 0,
        };
        let events = futures::stream::unfold(watch, |mut watch| async move {
            let event = watch.next_event().await;
            Some((event, watch))
        });
        InTokio(Some(Box::pin(events))).boxed()
    }
}

/// One service's watch: what it has reported so far, and the etcd watch it reads.
struct ServiceWatch {
    config: Arc<Config>,
    prefix: String,
    client: Option<Client>,
    stream: Option<WatchStream>,
    watching_since: Instant,
    /// Instances by key, as reported to the watcher.
    known: HashMap<Vec<u8>, Instance>,
    /// Whether the first listing went out.
    listed: bool,
    /// Consecutive failures, for the backoff.
    failures: u32,
}

impl ServiceWatch {
    async fn next_event(&mut self) -> Result<Vec<Change>, Status> {
        loop {
            if let Some(stream) = &mut self.stream {
                let error = match stream.message().await {
                    Ok(Some(response))
                        if response.canceled() || response.compact_revision() > 0 =>
                    {
                        let reason = if response.compact_revision() > 0 {
                            format!(
                                "history compacted up to revision {}",
                                response.compact_revision()
                            )
                        } else {
                            response.cancel_reason().to_owned()
                        };
                        self.config
                            .unavailable(&format!("watch of {}", self.prefix), reason)
                    }
                    Ok(Some(response)) => {
                        let changes = self.apply(response.events());
                        if changes.is_empty() {
                            continue;
                        }
                        return Ok(changes);
                    }
                    Ok(None) => self
                        .config
                        .unavailable(&format!("watch of {}", self.prefix), "stream ended"),
                    Err(e) => self
                        .config
                        .unavailable(&format!("watch of {}", self.prefix), e),
                };
                self.stream = None;
                // A watch that held for a while starts the backoff over; one that breaks
                // right after it started backs off further, so it never spins.
                self.failures = if self.watching_since.elapsed() > BACKOFF_MAX {
                    1
                } else {
                    self.failures + 1
                };
                tracing::warn!("{}", error.message());
                return Err(error);
            }
            if self.failures > 0 {
                tokio::time::sleep(backoff(self.failures)).await;
            }
            match self.list_and_watch().await {
                Ok(changes) => {
                    if !self.listed {
                        self.listed = true;
                        return Ok(changes);
                    }
                    if !changes.is_empty() {
                        return Ok(changes);
                    }
                }
                Err(error) => {
                    self.failures += 1;
                    tracing::warn!("{}", error.message());
                    return Err(error);
                }
            }
        }
    }

    /// Lists the service, starts a watch from the revision after the listing, and returns
    /// what changed since the last listing (everything, the first time). Nothing is
    /// committed unless both steps succeed, so a failed attempt loses no change.
    async fn list_and_watch(&mut self) -> Result<Vec<Change>, Status> {
        let config = self.config.clone();
        let client = match &mut self.client {
            Some(client) => client,
            None => self.client.insert(config.connect().await?),
        };
        let listing = config
            .timed(
                &format!("list {}", self.prefix),
                client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = listing.header().map_or(0, |h| h.revision());
        let known: HashMap<Vec<u8>, Instance> = listing
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key().to_vec(), parse_instance(kv)?)))
            .collect();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let stream = config
            .timed(
                &format!("watch {}", self.prefix),
                client.watch(self.prefix.as_str(), Some(options)),
            )
            .await?;
        let new: Vec<Instance> = known.values().cloned().collect();
        let changes = if self.listed {
            let old: Vec<Instance> = self.known.values().cloned().collect();
            diff(&old, &new)
        } else {
            new.into_iter().map(Change::Upsert).collect()
        };
        self.known = known;
        self.stream = Some(stream);
        self.watching_since = Instant::now();
        Ok(changes)
    }

    /// Folds watch events into `known` and says what the watcher must hear.
    fn apply(&mut self, events: &[Event]) -> Vec<Change> {
        let mut changes = Vec::new();
        for event in events {
            let Some(kv) = event.kv() else { continue };
            let added = match event.event_type() {
                EventType::Put => parse_instance(kv),
                EventType::Delete => None,
            };
            let removed = match &added {
                Some(instance) => self.known.insert(kv.key().to_vec(), instance.clone()),
                None => self.known.remove(kv.key()),
            };
            if let Some(old) =
                removed.filter(|old| Some(old.addr) != added.as_ref().map(|i| i.addr))
            {
                // Another key may still name the same address; then it stays.
                match self.known.values().find(|i| i.addr == old.addr) {
                    Some(still) => changes.push(Change::Upsert(still.clone())),
                    None => changes.push(Change::Remove(old.addr)),
                }
            }
            if let Some(instance) = added {
                changes.push(Change::Upsert(instance));
            }
        }
        changes
    }
}

/// Polls a stream inside a tokio context (the caller's, or async-compat's own runtime) and
/// drops it inside one too, since etcd-client's streams and tokio's timers need it.
struct InTokio<S>(Option<Pin<Box<S>>>);

impl<S: Stream> Stream for InTokio<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let Some(inner) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        let mut next = Compat::new(inner.next());
        Pin::new(&mut next).poll(cx)
    }
}

impl<S> Drop for InTokio<S> {
    fn drop(&mut self) {
        // Compat enters the tokio context while it drops what it wraps.
        drop(Compat::new(self.0.take()));
    }
}

/// The lease a registration currently lives under, shared by its upkeep and its
/// deregistration.
#[derive(Debug, Default)]
struct LeaseSlot {
    lease: Option<i64>,
    deregistered: bool,
}

/// What a registration needs to (re-)create its key.
struct Announcement {
    config: Arc<Config>,
    key: String,
    value: String,
}

impl Announcement {
    /// Grants a lease and puts the key under it; returns the lease.
    async fn announce(&self, client: &mut Client) -> Result<i64, Status> {
        let ttl = self.config.lease_ttl.as_secs() as i64;
        let lease = self
            .config
            .timed("grant lease", client.lease_grant(ttl, None))
            .await?
            .id();
        let put = client.put(
            self.key.as_str(),
            self.value.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        );
        if let Err(e) = self.config.timed(&format!("put {}", self.key), put).await {
            // Leave no lease behind; it would expire anyway.
            let _ = self
                .config
                .timed("revoke lease", client.lease_revoke(lease))
                .await;
            return Err(e);
        }
        Ok(lease)
    }

    /// Revokes `lease`, which deletes the key. A lease etcd no longer knows is already gone.
    async fn revoke(&self, client: &mut Client, lease: i64) -> Result<(), Status> {
        match tokio::time::timeout(self.config.request_timeout, client.lease_revoke(lease)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => {
                Ok(())
            }
            Ok(Err(e)) => Err(self.config.unavailable("revoke lease", e)),
            Err(_) => Err(self.config.unavailable(
                "revoke lease",
                format_args!("no answer within {:?}", self.config.request_timeout),
            )),
        }
    }
}

/// Why [`keep_alive`] stopped.
enum LeaseEnd {
    /// etcd says the lease is gone (expired, revoked, or etcd lost its data).
    Lost,
    /// The keep-alive stream failed; the lease may still be alive.
    Failed(Status),
}

/// Renews `lease` three times per TTL until etcd reports it gone or the stream fails.
/// `on_renewal` runs after each renewal etcd confirms.
async fn keep_alive(
    config: &Config,
    client: &mut Client,
    lease: i64,
    mut on_renewal: impl FnMut(),
) -> LeaseEnd {
    let (mut keeper, mut responses) = match config
        .timed("keep lease alive", client.lease_keep_alive(lease))
        .await
    {
        Ok(pair) => pair,
        Err(status) => return LeaseEnd::Failed(status),
    };
    let mut ticks = tokio::time::interval(config.lease_ttl / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Err(status) = config.timed("keep lease alive", keeper.keep_alive()).await {
            return LeaseEnd::Failed(status);
        }
        match config.timed("keep lease alive", responses.message()).await {
            Ok(Some(response)) if response.ttl() <= 0 => return LeaseEnd::Lost,
            Ok(Some(_)) => on_renewal(),
            Ok(None) => {
                return LeaseEnd::Failed(config.unavailable("keep lease alive", "stream ended"))
            }
            Err(status) => return LeaseEnd::Failed(status),
        }
    }
}

/// Keeps the registration alive until it is deregistered: renews its lease, and when the
/// lease is lost (etcd restarted without its data, the server was cut off past the TTL)
/// grants a new one and puts the key again.
async fn upkeep(announcement: Arc<Announcement>, mut client: Client, slot: Arc<Mutex<LeaseSlot>>) {
    let config = announcement.config.clone();
    let mut failures = 0u32;
    loop {
        let current = {
            let slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.deregistered {
                return;
            }
            slot.lease
        };
        let lease = match current {
            Some(lease) => lease,
            None => match announcement.announce(&mut client).await {
                Ok(lease) => {
                    let deregistered = {
                        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                        slot.lease = Some(lease);
                        slot.deregistered
                    };
                    if deregistered {
                        // Deregistered while this lease was being granted: take it back.
                        let _ = announcement.revoke(&mut client, lease).await;
                        return;
                    }
                    tracing::info!(key = %announcement.key, lease, "etcd: registered again");
                    lease
                }
                Err(status) => {
                    failures += 1;
                    tracing::warn!(key = %announcement.key, "etcd: cannot register again: {}", status.message());
                    tokio::time::sleep(backoff(failures)).await;
                    continue;
                }
            },
        };
        match keep_alive(&config, &mut client, lease, || failures = 0).await {
            LeaseEnd::Lost => {
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                if slot.lease == Some(lease) {
                    slot.lease = None;
                }
                if !slot.deregistered {
                    tracing::warn!(key = %announcement.key, lease, "etcd: lease lost; registering again");
                }
            }
            LeaseEnd::Failed(status) => {
                failures += 1;
                tracing::warn!(key = %announcement.key, lease, "etcd: keep-alive failed: {}", status.message());
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

impl Register for Etcd {
    fn register(
        &self,
        registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        if let Err(status) = check_service(&registration.service) {
            return futures::future::ready(Err(status)).boxed();
        }
        let record = InstanceRecord {
            addr,
            weight: registration.weight,
        };
        let announcement = Arc::new(Announcement {
            config: self.config.clone(),
            key: self.config.instance_key(&registration.service, addr),
            value: serde_json::to_string(&record).expect("an address and a number serialize"),
        });
        Compat::new(async move {
            let mut client = announcement.config.connect().await?;
            let lease = announcement.announce(&mut client).await?;
            let slot = Arc::new(Mutex::new(LeaseSlot {
                lease: Some(lease),
                deregistered: false,
            }));
            let upkeep_future =
                Compat::new(upkeep(announcement.clone(), client.clone(), slot.clone())).boxed();
            let deregister = move || {
                Compat::new(async move {
                    let lease = {
                        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                        slot.deregistered = true;
                        slot.lease.take()
                    };
                    match lease {
                        Some(lease) => announcement.revoke(&mut client, lease).await,
                        None => Ok(()),
                    }
                })
                .boxed()
            };
            Ok(Registered {
                upkeep: upkeep_future,
                deregister: Box::new(deregister),
            })
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_normalized() {
        let etcd = Etcd::new(["http://127.0.0.1:2379", "10.0.0.1:2379"]).unwrap();
        assert_eq!(
            etcd.endpoints(),
            ["http://127.0.0.1:2379", "http://10.0.0.1:2379"]
        );
        assert_eq!(
            Etcd::new(Vec::<String>::new()).unwrap_err(),
            EtcdConfigError::NoEndpoints
        );
        for bad in [
            "http://127.0.0.1",
            "https://127.0.0.1:2379",
            "http://:2379",
            "http://127.0.0.1:2379/v3",
            "not a url",
            "",
        ] {
            match Etcd::new([bad]).unwrap_err() {
                EtcdConfigError::BadEndpoint { endpoint, .. } => assert_eq!(endpoint, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn prefix_and_ttl_are_checked() {
        let etcd = Etcd::new(["127.0.0.1:2379"]).unwrap();
        assert_eq!(etcd.prefix(), DEFAULT_PREFIX);
        assert_eq!(etcd.lease_ttl(), DEFAULT_LEASE_TTL);
        let etcd = etcd.with_prefix("/apps/").unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert_eq!(
            etcd.instance_key("greeter", addr),
            "/apps/greeter/127.0.0.1:5000"
        );
        for bad in ["", "/", "//", "apps"] {
            assert!(matches!(
                etcd.clone().with_prefix(bad),
                Err(EtcdConfigError::BadPrefix { .. })
            ));
        }
        assert_eq!(
            etcd.clone()
                .with_lease_ttl(Duration::from_millis(1500))
                .unwrap()
                .lease_ttl(),
            Duration::from_secs(2)
        );
        assert!(etcd.with_lease_ttl(Duration::from_millis(999)).is_err());
    }

    #[test]
    fn service_names_must_be_one_key_segment() {
        assert!(check_service("greeter").is_ok());
        for bad in ["", "a/b", "a b", "a\nb"] {
            let status = check_service(bad).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), BACKOFF_MIN);
        assert_eq!(backoff(2), BACKOFF_MIN * 2);
        assert_eq!(backoff(100), BACKOFF_MAX);
    }
}
