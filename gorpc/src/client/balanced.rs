//! Calling a service by name: the instances a [`Discover`] watch reports, one connection
//! pool per instance, a [`Balancer`] choosing among them, and outlier ejection.
//!
//! The watch runs as a task on the client's runtime and edits the shared table; calls read
//! it under one short lock to pick and once more to report how the call went (in-flight
//! counts and latency for load-aware balancers, failures for ejection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::StreamExt;
use gorpc_proto::balance::{Balancer, Endpoint, EndpointId, Health};
use gorpc_proto::policy::{Admission, CircuitBreaker};
use gorpc_proto::{Code, Status, StreamKind};

use super::call::OutgoingCall;
use super::pool::{EndpointPool, Pool, PoolConfig};
use super::{send_on, start_stream_on, RawResponse, StreamHalves};
use crate::discovery::{Change, Discover};
use crate::runtime::Runtime;

/// When an instance is taken out of rotation for failing: a circuit breaker per instance
/// ([`gorpc_proto::policy::CircuitBreaker`]). Closed, it counts consecutive failures;
/// open, the instance gets no calls for `ejection`; then half-open, `trial_calls` calls go
/// to it and the first to succeed brings it back, the first to fail opens it again.
#[derive(Clone, Copy, Debug)]
pub struct OutlierDetection {
    /// Calls in a row that failed with `Unavailable` or `DeadlineExceeded` before the
    /// instance is ejected. A connect failure ejects at once (the call is then sent to
    /// another instance, since it never left).
    pub consecutive_failures: u32,
    /// How long an ejected instance stays out before its trial calls.
    pub ejection: Duration,
    /// Calls let through at once to an instance whose ejection ended.
    pub trial_calls: u32,
    /// At most this share of the instances is out at once (at least one may always be),
    /// so a bad network day does not empty the rotation: past it, failures go uncounted.
    pub max_ejected_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            ejection: Duration::from_secs(10),
            trial_calls: 1,
            max_ejected_percent: 50,
        }
    }
}

/// One discovered instance as a client sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// Its weight, as discovery reported it.
    pub weight: u32,
    /// Out of rotation for failing, until its ejection ends.
    pub ejected: bool,
}

/// A call that could not reach an instance is tried on this many instances in all.
const INSTANCES_PER_CALL: usize = 3;

type NewPool = Box<dyn Fn(SocketAddr) -> InstanceCalls + Send + Sync>;

/// What carries a balanced client's calls to one instance.
#[derive(Clone)]
pub(crate) enum InstanceCalls {
    /// Binary-protocol connections: the hot path, no boxing per call.
    Pool(Arc<dyn Pool>),
    /// Another protocol (gRPC), through boxed futures.
    #[cfg_attr(not(feature = "grpc"), allow(dead_code))]
    Boxed(Arc<dyn BoxedCalls>),
}

/// Unary and stream calls to one instance through boxed futures, which other protocols'
/// channels provide (their calls box anyway), so that the table needs no runtime type.
pub(crate) trait BoxedCalls: Send + Sync + 'static {
    fn send(
        &self,
        call: OutgoingCall,
    ) -> BoxFuture<'static, Result<Result<RawResponse, Status>, (Status, OutgoingCall)>>;

    fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> BoxFuture<'static, Result<StreamHalves, (Status, OutgoingCall)>>;
}

/// How a balanced client talks to its instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum InstanceProtocol {
    /// gorpc's binary protocol, over a pool of connections per instance.
    #[default]
    Binary,
    /// gRPC over HTTP/2: the instances may be any gRPC servers.
    #[cfg(feature = "grpc")]
    Grpc,
}

impl InstanceCalls {
    /// Sends `call`; one that never left comes back with the reason.
    async fn send(
        &self,
        call: OutgoingCall,
    ) -> Result<Result<RawResponse, Status>, (Status, OutgoingCall)> {
        match self {
            InstanceCalls::Pool(pool) => send_on(&**pool, call).await.map_err(|unsent| *unsent),
            InstanceCalls::Boxed(calls) => calls.send(call).await,
        }
    }

    async fn start_stream(
        &self,
        call: OutgoingCall,
        kind: StreamKind,
    ) -> Result<StreamHalves, (Status, OutgoingCall)> {
        match self {
            InstanceCalls::Pool(pool) => start_stream_on(&**pool, call, kind).await,
            InstanceCalls::Boxed(calls) => calls.start_stream(call, kind).await,
        }
    }
}
type SleepUntil = Box<dyn Fn(Instant) -> BoxFuture<'static, ()> + Send + Sync>;

/// The client side of one discovered service.
pub(crate) struct Balanced {
    service: String,
    table: Mutex<Table>,
    outlier: OutlierDetection,
    new_pool: NewPool,
    sleep_until: SleepUntil,
    watch: AbortHandle,
}

struct Instance {
    addr: SocketAddr,
    weight: u32,
    calls: InstanceCalls,
    breaker: CircuitBreaker,
    /// Out of the balancer's rotation until then (the breaker's open period).
    ejected_until: Option<Instant>,
}

struct Table {
    balancer: Box<dyn Balancer + Send>,
    instances: HashMap<EndpointId, Instance>,
    /// The watch has reported something (instances or an error).
    resolved: bool,
    /// The registry's last error, while it has not answered since.
    registry_error: Option<Status>,
    /// Calls waiting for the first answer of the watch.
    waiting: Vec<Waker>,
    /// Earliest end of an ejection, so picks check the clock only when one is due.
    next_return: Option<Instant>,
}

impl Table {
    /// Tells the balancer the current set: weights, and ejected instances as down.
    fn publish(&mut self) {
        let endpoints: Vec<Endpoint> = self
            .instances
            .iter()
            .map(|(&id, i)| {
                let health = if i.ejected_until.is_some() {
                    Health::Down
                } else {
                    Health::Up
                };
                Endpoint::new(id).with_weight(i.weight).with_health(health)
            })
            .collect();
        self.balancer.update(&endpoints);
    }

    fn return_ejected(&mut self, now: Instant) {
        if self.next_return.is_none_or(|t| now < t) {
            return;
        }
        self.next_return = None;
        for instance in self.instances.values_mut() {
            match instance.ejected_until {
                Some(until) if until <= now => {
                    tracing::info!(addr = %instance.addr, "ejection over; trial calls next");
                    instance.ejected_until = None;
                }
                Some(until) => {
                    self.next_return = Some(self.next_return.map_or(until, |t| t.min(until)))
                }
                None => {}
            }
        }
        self.publish();
    }

    fn apply(&mut self, changes: Vec<Change>, new_pool: &NewPool, outlier: &OutlierDetection) {
        for change in changes {
            match change {
                Change::Upsert(found) => {
                    let id = endpoint_id(found.addr);
                    match self.instances.get_mut(&id) {
                        Some(known) => known.weight = found.weight,
                        None => {
                            self.instances.insert(
                                id,
                                Instance {
                                    addr: found.addr,
                                    weight: found.weight,
                                    calls: new_pool(found.addr),
                                    breaker: CircuitBreaker::new(
                                        outlier.consecutive_failures,
                                        outlier.ejection,
                                        outlier.trial_calls,
                                        Instant::now(),
                                    ),
                                    ejected_until: None,
                                },
                            );
                        }
                    }
                }
                // Calls in flight keep their connection alive until they finish.
                Change::Remove(addr) => {
                    self.instances.remove(&endpoint_id(addr));
                }
            }
        }
        self.publish();
    }

    /// Whether one more instance may leave the rotation.
    fn may_eject(&self, outlier: &OutlierDetection) -> bool {
        let total = self.instances.len();
        let out = self
            .instances
            .values()
            .filter(|i| i.ejected_until.is_some())
            .count();
        out < (total * usize::from(outlier.max_ejected_percent) / 100).max(1)
    }

    /// Takes an instance whose breaker just opened out of the rotation.
    fn eject(&mut self, id: EndpointId) {
        let Some(instance) = self.instances.get_mut(&id) else {
            return;
        };
        let Some(until) = instance.breaker.open_until() else {
            return;
        };
        if instance.ejected_until.is_some() {
            return;
        }
        tracing::warn!(addr = %instance.addr, "instance ejected after failures");
        instance.ejected_until = Some(until);
        self.next_return = Some(self.next_return.map_or(until, |t| t.min(until)));
        self.publish();
    }
}

fn endpoint_id(addr: SocketAddr) -> EndpointId {
    // Derived from the address alone, so every client places an instance at the same spot
    // on a hash ring.
    let mut buf = [0u8; 18];
    let bytes: &[u8] = match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            buf[..4].copy_from_slice(&ip.octets());
            buf[4..6].copy_from_slice(&addr.port().to_be_bytes());
            &buf[..6]
        }
        std::net::IpAddr::V6(ip) => {
            buf[..16].copy_from_slice(&ip.octets());
            buf[16..].copy_from_slice(&addr.port().to_be_bytes());
            &buf[..]
        }
    };
    EndpointId(gorpc_proto::balance::hash_bytes(bytes))
}

/// How a call went, as far as the instance's health is concerned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The caller stopped waiting before an outcome.
    Abandoned,
    /// Answered (whatever the status: the instance works).
    Healthy,
    /// Failed in a way that points at the instance.
    Failed,
    /// Could not even connect.
    Unreachable,
}

fn verdict(result: &Result<RawResponse, Status>) -> Verdict {
    match result {
        Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => Verdict::Failed,
        _ => Verdict::Healthy,
    }
}

impl Balanced {
    pub(crate) fn start<R: Runtime>(
        runtime: R,
        discover: Arc<dyn Discover>,
        service: String,
        balancer: Box<dyn Balancer + Send>,
        pool: PoolConfig,
        outlier: OutlierDetection,
        protocol: InstanceProtocol,
    ) -> Arc<Self> {
        let (watch, registration) = AbortHandle::new_pair();
        let pool_runtime = runtime.clone();
        let sleep_runtime = runtime.clone();
        let this = Arc::new(Balanced {
            table: Mutex::new(Table {
                balancer,
                instances: HashMap::new(),
                resolved: false,
                registry_error: None,
                waiting: Vec::new(),
                next_return: None,
            }),
            outlier,
            new_pool: Box::new(move |addr| match protocol {
                InstanceProtocol::Binary => InstanceCalls::Pool(Arc::new(EndpointPool::new(
                    pool_runtime.clone(),
                    addr,
                    pool.clone(),
                ))),
                #[cfg(feature = "grpc")]
                InstanceProtocol::Grpc => {
                    InstanceCalls::Boxed(Arc::new(crate::grpc::GrpcChannel::new(
                        pool_runtime.clone(),
                        addr,
                        pool.connection.clone(),
                    )))
                }
            }),
            sleep_until: Box::new(move |at| Box::pin(sleep_runtime.sleep_until(at))),
            watch,
            service,
        });
        let events = discover.watch(&this.service);
        let weak = Arc::downgrade(&this);
        let task = async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let Some(this) = weak.upgrade() else { return };
                let mut table = this.lock();
                match event {
                    Ok(changes) => {
                        table.registry_error = None;
                        table.apply(changes, &this.new_pool, &this.outlier);
                    }
                    Err(error) => {
                        tracing::warn!(service = %this.service, %error, "discovery failed; keeping the known instances");
                        table.registry_error = Some(error);
                    }
                }
                table.resolved = true;
                for waker in table.waiting.drain(..) {
                    waker.wake();
                }
            }
            if let Some(this) = weak.upgrade() {
                tracing::warn!(service = %this.service, "discovery watch ended; keeping the last instances");
                let mut table = this.lock();
                table.resolved = true;
                for waker in table.waiting.drain(..) {
                    waker.wake();
                }
            }
        };
        runtime.spawn(async move {
            let _ = Abortable::new(task, registration).await;
        });
        this
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `deadline`) until the watch has answered once.
    async fn resolved(&self, deadline: Option<Instant>) -> Result<(), Status> {
        if self.lock().resolved {
            return Ok(());
        }
        let mut sleep = deadline.map(|d| (self.sleep_until)(d));
        std::future::poll_fn(|cx| {
            {
                let mut table = self.lock();
                if table.resolved {
                    return Poll::Ready(Ok(()));
                }
                if !table.waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    table.waiting.push(cx.waker().clone());
                }
            }
            let expired = sleep
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_ready());
            if expired {
                return Poll::Ready(Err(Status::new(
                    Code::DeadlineExceeded,
                    format!(
                        "deadline passed before discovery answered for {:?}",
                        self.service
                    ),
                )));
            }
            Poll::Pending
        })
        .await
    }

    /// Chooses an instance for one call, admits it through the instance's breaker and
    /// counts the call as started on it.
    fn pick(&self, mut key: Option<u64>) -> Result<(EndpointId, InstanceCalls), Status> {
        let now = Instant::now();
        let mut table = self.lock();
        table.return_ejected(now);
        // An instance on trial may have no slot left; then look further (without the key,
        // which would only name the same instance again).
        for _ in 0..table.instances.len().max(1) {
            let Some(id) = table.balancer.pick(key) else {
                return Err(self.nothing_to_pick(&table));
            };
            let Some(instance) = table.instances.get_mut(&id) else {
                return Err(Status::new(
                    Code::Internal,
                    "balancer picked an instance outside its set",
                ));
            };
            match instance.breaker.allow(now) {
                Admission::Allowed | Admission::Trial => {
                    let calls = instance.calls.clone();
                    table.balancer.on_start(id);
                    return Ok((id, calls));
                }
                Admission::Open { .. } => table.eject(id),
                Admission::TrialsBusy => key = None,
            }
        }
        Err(self.nothing_to_pick(&table))
    }

    fn nothing_to_pick(&self, table: &Table) -> Status {
        let service = &self.service;
        let reason = match (&table.registry_error, table.instances.len()) {
            (Some(e), 0) => format!("no instances of {service:?} known: {}", e.message()),
            (None, 0) => format!("no instances of {service:?} registered"),
            (_, n) => format!("all {n} instances of {service:?} are ejected, on trial or drained"),
        };
        Status::new(Code::Unavailable, reason)
    }

    fn finish(&self, id: EndpointId, started: Instant, verdict: Verdict) {
        let now = Instant::now();
        let mut table = self.lock();
        table
            .balancer
            .on_finish(id, now - started, verdict != Verdict::Failed);
        let may_eject = table.may_eject(&self.outlier);
        let Some(instance) = table.instances.get_mut(&id) else {
            return;
        };
        let breaker = &mut instance.breaker;
        match verdict {
            Verdict::Abandoned => breaker.on_abandoned(now),
            Verdict::Healthy => breaker.on_success(now),
            // Past the ejection cap a failure that would open the breaker goes uncounted.
            Verdict::Failed if breaker.would_open_on_failure() && !may_eject => {}
            Verdict::Failed => breaker.on_failure(now),
            Verdict::Unreachable if may_eject => breaker.trip(now),
            Verdict::Unreachable => {}
        }
        table.eject(id);
    }

    /// Sends `call` to an instance of the service.
    pub(crate) async fn send(&self, mut call: OutgoingCall) -> Result<RawResponse, Status> {
        self.resolved(call.deadline).await?;
        let mut last_error = None;
        for _ in 0..INSTANCES_PER_CALL {
            let (id, calls) = match self.pick(call.key) {
                Ok(picked) => picked,
                Err(status) => return Err(last_error.unwrap_or(status)),
            };
            let mut report = Report {
                balanced: self,
                id,
                started: Instant::now(),
                verdict: Verdict::Abandoned,
            };
            match calls.send(call).await {
                Ok(result) => {
                    report.verdict = verdict(&result);
                    return result;
                }
                Err((status, unsent)) => {
                    report.verdict = Verdict::Unreachable;
                    last_error = Some(status);
                    call = unsent;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Status::new(Code::Unavailable, "no instance reachable")))
    }

    /// Starts a stream call on an instance the balancer picks, skipping (and reporting)
    /// instances that cannot be reached, like [`send`](Self::send). The instance is
    /// reported healthy once the stream started, and the stream then counts as open on it
    /// (load for load-aware balancers) until its receiver sees the end or is dropped.
    pub(crate) async fn start_stream(
        self: &Arc<Self>,
        mut call: OutgoingCall,
        kind: StreamKind,
    ) -> Result<StreamHalves, Status> {
        self.resolved(call.deadline).await?;
        let mut last_error = None;
        for _ in 0..INSTANCES_PER_CALL {
            let (id, calls) = match self.pick(call.key) {
                Ok(picked) => picked,
                Err(status) => return Err(last_error.unwrap_or(status)),
            };
            let mut report = Report {
                balanced: self,
                id,
                started: Instant::now(),
                verdict: Verdict::Abandoned,
            };
            match calls.start_stream(call, kind).await {
                Ok((sender, receiver)) => {
                    report.verdict = Verdict::Healthy;
                    self.lock().balancer.on_stream_open(id);
                    let open = OpenStream {
                        balanced: Arc::downgrade(self),
                        id,
                    };
                    return Ok((sender, receiver.counted_open(open)));
                }
                Err((status, unsent)) => {
                    report.verdict = Verdict::Unreachable;
                    last_error = Some(status);
                    call = unsent;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Status::new(Code::Unavailable, "no instance reachable")))
    }

    pub(crate) fn instances(&self) -> Vec<InstanceStatus> {
        let table = self.lock();
        let mut list: Vec<_> = table
            .instances
            .values()
            .map(|i| InstanceStatus {
                addr: i.addr,
                weight: i.weight,
                ejected: i.ejected_until.is_some(),
            })
            .collect();
        list.sort_by_key(|i| i.addr);
        list
    }
}

impl Drop for Balanced {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

/// A stream open on one instance: reports the stream's end to the balancer when dropped.
/// Weak, so that a stream outliving its client does not keep the client's table alive.
pub(crate) struct OpenStream {
    balanced: Weak<Balanced>,
    id: EndpointId,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(balanced) = self.balanced.upgrade() {
            balanced.lock().balancer.on_stream_end(self.id);
        }
    }
}

/// Reports a call's end to the table, also when the caller drops the call midway.
struct Report<'a> {
    balanced: &'a Balanced,
    id: EndpointId,
    started: Instant,
    verdict: Verdict,
}

impl Drop for Report<'_> {
    fn drop(&mut self) {
        self.balanced.finish(self.id, self.started, self.verdict);
    }
}
