//! Service discovery and registration: how a client finds a service's instances by name, and
//! how a server announces itself.
//!
//! A registry plugin implements [`Discover`] (a watch of one service's instances) and
//! [`Register`] (announce one instance and keep it announced). gorpc-plugins has Consul and
//! etcd; [`StaticList`] here serves a fixed list. Neither trait names a runtime: a watch is a
//! `Stream` and a registration's upkeep is a future, both polled by whoever drives the client
//! or server, so one plugin works on every runtime.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use gorpc_proto::{Code, Status};

/// One instance of a service, as a registry reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// Relative share of calls. 0 drains the instance: no new calls, calls in flight finish.
    pub weight: u32,
}

impl Instance {
    /// An instance with weight 1.
    pub fn new(addr: SocketAddr) -> Self {
        Instance { addr, weight: 1 }
    }

    /// This instance with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// One change to a service's set of instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The instance appeared, or its weight changed.
    Upsert(Instance),
    /// The instance left (deregistered, failed its health check, its lease expired).
    Remove(SocketAddr),
}

/// What a watch yields: a batch of changes to apply together, or why the registry could not
/// be read just now. After an error the watch keeps trying; the client keeps the instances it
/// knows, and calls fail with the error's reason only while it knows none.
pub type WatchEvent = Result<Vec<Change>, Status>;

/// A source of service instances.
pub trait Discover: Send + Sync + 'static {
    /// Watches `service`. The first `Ok` item holds every current instance as
    /// [`Change::Upsert`]s (possibly none); later items hold what changed. The stream should
    /// not end while the registry is reachable; when it ends, the client keeps the last set.
    fn watch(&self, service: &str) -> BoxStream<'static, WatchEvent>;
}

impl<D: Discover + ?Sized> Discover for Arc<D> {
    fn watch(&self, service: &str) -> BoxStream<'static, WatchEvent> {
        (**self).watch(service)
    }
}

/// An instance a server announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The service name clients discover it by.
    pub service: String,
    /// The address clients should dial. `None`: the server's bound address (fine on
    /// loopback and when bound to a concrete interface address, wrong for `0.0.0.0`).
    pub addr: Option<SocketAddr>,
    /// Relative share of calls the instance asks for (default 1); 0 takes no new calls.
    pub weight: u32,
}

impl Registration {
    /// An instance of `service` at the server's bound address, with weight 1.
    pub fn new(service: impl Into<String>) -> Self {
        Registration {
            service: service.into(),
            addr: None,
            weight: 1,
        }
    }

    /// Announces `addr` instead of the bound address (for a server bound to `0.0.0.0`).
    pub fn with_addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    /// This registration with another weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// A registration in force, as a [`Register`] hands it back to the server.
pub struct Registered {
    /// Keeps the registration alive (TTL heartbeats, lease keep-alives) for as long as it is
    /// polled. The server runs it on its runtime until shutdown; it should never finish
    /// unless the registration is lost for good.
    pub upkeep: BoxFuture<'static, ()>,
    /// Removes the instance. The server awaits it at graceful shutdown before draining, so
    /// clients stop picking this instance while its calls in flight still complete.
    pub deregister: Box<dyn FnOnce() -> BoxFuture<'static, Result<(), Status>> + Send>,
}

impl std::fmt::Debug for Registered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered").finish_non_exhaustive()
    }
}

/// A registry servers announce themselves in.
pub trait Register: Send + Sync + 'static {
    /// Announces an instance of `registration.service` at `addr` (the registration's own
    /// address, or the server's bound one).
    fn register(
        &self,
        registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>>;
}

impl<R: Register + ?Sized> Register for Arc<R> {
    fn register(
        &self,
        registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        (**self).register(registration, addr)
    }
}

/// A fixed list of instances per service, from code or configuration.
#[derive(Clone, Debug, Default)]
pub struct StaticList {
    services: HashMap<String, Vec<Instance>>,
}

impl StaticList {
    /// A list with no services.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `instances` to `service`.
    pub fn with(mut self, service: &str, instances: impl IntoIterator<Item = Instance>) -> Self {
        self.services
            .entry(service.to_owned())
            .or_default()
            .extend(instances);
        self
    }

    /// Parses `"host:port"` addresses (IP literals; names need a resolver). The error names
    /// the address that did not parse.
    pub fn parse(service: &str, addrs: &[&str]) -> Result<Self, Status> {
        let instances = addrs
            .iter()
            .map(|a| {
                a.parse::<SocketAddr>().map(Instance::new).map_err(|e| {
                    Status::new(
                        Code::InvalidArgument,
                        format!("static list for {service:?}: bad address {a:?}: {e}"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new().with(service, instances))
    }
}

impl Discover for StaticList {
    fn watch(&self, service: &str) -> BoxStream<'static, WatchEvent> {
        let event = match self.services.get(service) {
            Some(list) => Ok(list.iter().cloned().map(Change::Upsert).collect()),
            None => Err(Status::new(
                Code::Unavailable,
                format!("static list has no service {service:?}"),
            )),
        };
        // One answer, then silence: a static list never changes, and ending the stream
        // would only make the client log that its watch stopped.
        futures::stream::once(async move { event })
            .chain(futures::stream::pending())
            .boxed()
    }
}

/// Instances from DNS: `host:port` names resolved now and again, every address an
/// instance of weight 1. Resolution runs on a thread of its own (the system resolver
/// blocks), which ends when the watch is dropped; a failed lookup is reported and the last
/// good answer kept.
#[derive(Clone, Debug)]
pub struct Dns {
    names: Vec<String>,
    every: Duration,
}

impl Dns {
    /// Resolves `names` ("host:port") every `every`.
    pub fn new(names: impl IntoIterator<Item = impl Into<String>>, every: Duration) -> Self {
        Dns {
            names: names.into_iter().map(Into::into).collect(),
            every,
        }
    }

    fn resolve(&self) -> Result<Vec<Instance>, Status> {
        use std::net::ToSocketAddrs;
        let mut found = Vec::new();
        for name in &self.names {
            let addrs = name.to_socket_addrs().map_err(|e| {
                Status::new(Code::Unavailable, format!("resolving {name:?} failed: {e}"))
            })?;
            found.extend(addrs.map(Instance::new));
        }
        found.sort_by_key(|i| i.addr);
        found.dedup();
        Ok(found)
    }
}

impl Discover for Dns {
    /// The service name is not looked up: the names given to [`Dns::new`] are the service.
    fn watch(&self, _service: &str) -> BoxStream<'static, WatchEvent> {
        let (tx, rx) = mpsc::unbounded();
        let dns = self.clone();
        let spawned = std::thread::Builder::new()
            .name("gorpc-dns".into())
            .spawn(move || {
                let mut known: Vec<Instance> = Vec::new();
                let mut first = true;
                loop {
                    let event = match dns.resolve() {
                        Ok(now) => {
                            let changes = if first {
                                now.iter().cloned().map(Change::Upsert).collect()
                            } else {
                                diff(&known, &now)
                            };
                            known = now;
                            first = false;
                            Ok(changes)
                        }
                        Err(e) => Err(e),
                    };
                    let quiet = matches!(&event, Ok(c) if c.is_empty());
                    if !quiet && tx.unbounded_send(event).is_err() {
                        return;
                    }
                    std::thread::sleep(dns.every);
                    if tx.is_closed() {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            let status = Status::new(Code::Internal, format!("no thread for DNS lookups: {e}"));
            return futures::stream::once(async move { Err(status) }).boxed();
        }
        rx.boxed()
    }
}

/// A registry inside one process: servers register, clients watch, no network. For tests,
/// examples, and services that call themselves. Clones share the same registry.
#[derive(Clone, Debug, Default)]
pub struct MemoryRegistry {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    services: HashMap<String, Vec<Instance>>,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
}

impl MemoryInner {
    fn notify(&mut self, service: &str, change: Change) {
        self.watchers.retain(|(watched, tx)| {
            watched != service || tx.unbounded_send(Ok(vec![change.clone()])).is_ok()
        });
    }
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or updates an instance, as a registration would.
    pub fn insert(&self, service: &str, instance: Instance) {
        let mut inner = self.lock();
        let list = inner.services.entry(service.to_owned()).or_default();
        list.retain(|i| i.addr != instance.addr);
        list.push(instance.clone());
        inner.notify(service, Change::Upsert(instance));
    }

    /// Removes an instance, as a deregistration or an expiry would.
    pub fn remove(&self, service: &str, addr: SocketAddr) {
        let mut inner = self.lock();
        if let Some(list) = inner.services.get_mut(service) {
            let before = list.len();
            list.retain(|i| i.addr != addr);
            if list.len() != before {
                inner.notify(service, Change::Remove(addr));
            }
        }
    }

    /// The instances of `service` now.
    pub fn instances(&self, service: &str) -> Vec<Instance> {
        self.lock()
            .services
            .get(service)
            .cloned()
            .unwrap_or_default()
    }
}

impl Discover for MemoryRegistry {
    fn watch(&self, service: &str) -> BoxStream<'static, WatchEvent> {
        let (tx, rx) = mpsc::unbounded();
        let mut inner = self.lock();
        let current = inner.services.get(service).cloned().unwrap_or_default();
        let _ = tx.unbounded_send(Ok(current.into_iter().map(Change::Upsert).collect()));
        inner.watchers.push((service.to_owned(), tx));
        rx.boxed()
    }
}

impl Register for MemoryRegistry {
    fn register(
        &self,
        registration: &Registration,
        addr: SocketAddr,
    ) -> BoxFuture<'static, Result<Registered, Status>> {
        let (service, weight) = (registration.service.clone(), registration.weight);
        let registry = self.clone();
        Box::pin(async move {
            registry.insert(&service, Instance::new(addr).with_weight(weight));
            Ok(Registered {
                upkeep: Box::pin(futures::future::pending()),
                deregister: Box::new(move || {
                    registry.remove(&service, addr);
                    Box::pin(async { Ok(()) })
                }),
            })
        })
    }
}

/// The changes that turn instance set `old` into `new`, for registries that answer with
/// whole snapshots (Consul's health endpoint). Instances are keyed by address; the last
/// occurrence of an address in `new` wins.
pub fn diff(old: &[Instance], new: &[Instance]) -> Vec<Change> {
    let before: HashMap<SocketAddr, u32> = old.iter().map(|i| (i.addr, i.weight)).collect();
    let after: HashMap<SocketAddr, u32> = new.iter().map(|i| (i.addr, i.weight)).collect();
    let mut changes: Vec<Change> = old
        .iter()
        .filter(|i| !after.contains_key(&i.addr))
        .map(|i| Change::Remove(i.addr))
        .collect();
    changes.dedup();
    for (&addr, &weight) in &after {
        if before.get(&addr) != Some(&weight) {
            changes.push(Change::Upsert(Instance { addr, weight }));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn diff_reports_adds_removes_and_weight_changes_only() {
        let old = [
            Instance::new(addr(1)),
            Instance::new(addr(2)),
            Instance::new(addr(3)),
        ];
        let new = [
            Instance::new(addr(2)),
            Instance::new(addr(3)).with_weight(5),
            Instance::new(addr(4)),
        ];
        let mut changes = diff(&old, &new);
        changes.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            changes,
            vec![
                Change::Remove(addr(1)),
                Change::Upsert(Instance::new(addr(3)).with_weight(5)),
                Change::Upsert(Instance::new(addr(4))),
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn dns_resolves_names_and_reports_failures() {
        let dns = Dns::new(
            ["localhost:7070", "127.0.0.1:7071"],
            Duration::from_secs(60),
        );
        let mut watch = dns.watch("any");
        let first = futures::executor::block_on(watch.next()).unwrap().unwrap();
        assert!(
            first.contains(&Change::Upsert(Instance::new(addr(7071)))),
            "{first:?}"
        );
        assert!(
            first
                .iter()
                .any(|c| matches!(c, Change::Upsert(i) if i.addr.port() == 7070)),
            "{first:?}"
        );
        // Malformed, so it fails without asking any resolver.
        let bad = Dns::new(["no-port-given"], Duration::from_secs(60));
        let err = futures::executor::block_on(bad.watch("any").next())
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains("no-port-given"), "{err}");
    }

    #[test]
    fn static_list_names_the_bad_address() {
        let err = StaticList::parse("greeter", &["127.0.0.1:1", "localhost:80"]).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("\"localhost:80\""), "{err}");
    }

    #[test]
    fn static_list_answers_once_and_unknown_services_fail() {
        let list = StaticList::parse("greeter", &["127.0.0.1:1", "127.0.0.1:2"]).unwrap();
        let first = futures::FutureExt::now_or_never(list.watch("greeter").next()).flatten();
        assert_eq!(first.unwrap().unwrap().len(), 2);
        let unknown = futures::FutureExt::now_or_never(list.watch("nope").next()).flatten();
        assert_eq!(unknown.unwrap().unwrap_err().code(), Code::Unavailable);
    }
}
