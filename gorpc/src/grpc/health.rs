//! `grpc.health.v1.Health`, gRPC's health checking service
//! (<https://github.com/grpc/grpc/blob/master/doc/health-checking.md>).
//!
//! Every service the server hosts has a status, and so has the server as a whole, under
//! the empty name. They start [`ServingStatus::Serving`]; a [`HealthReporter`] changes
//! them. Whenever the server is not serving (its shutdown started, or it was set not
//! serving), every one of them reads [`ServingStatus::NotServing`], and reads its own
//! status again once the server serves again.
//!
//! - `Check` answers a status, or `NotFound` for a service without one;
//! - `Watch` sends the status at once, then each change until the call ends; a service
//!   without a status reads [`ServingStatus::ServiceUnknown`] until it gets one;
//! - `List` answers every status at once (at most [`LIST_LIMIT`], else
//!   `ResourceExhausted`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::future::BoxFuture;
use gorpc_proto::{Code, Status, StreamKind};

use crate::codec::Protobuf;
use crate::server::Serving;
use crate::service::{
    server_stream_call, unary_call, unimplemented, MethodSchema, NamedService, Request, Response,
    ServerReply, ServerRequest, Service,
};
use crate::stream::ResponseSink;

/// The method path of `Check`.
pub const CHECK: &str = "/grpc.health.v1.Health/Check";
/// The method path of `Watch`.
pub const WATCH: &str = "/grpc.health.v1.Health/Watch";
/// The method path of `List`.
pub const LIST: &str = "/grpc.health.v1.Health/List";

/// The most statuses `List` answers with: past it, the call fails with
/// `ResourceExhausted`, as the service definition says.
pub const LIST_LIMIT: usize = 100;

/// The encoded `google.protobuf.FileDescriptorSet` of grpc/health/v1/health.proto (as in
/// gorpc's proto/ directory, without source info), through which [`Health`] describes its
/// messages.
pub static FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/health.bin");

/// A serving status (`grpc.health.v1.HealthCheckResponse.ServingStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServingStatus {
    /// Not known.
    Unknown = 0,
    /// Serving.
    Serving = 1,
    /// Not serving.
    NotServing = 2,
    /// No status for the watched service (only `Watch` answers it).
    ServiceUnknown = 3,
}

/// The request of `Check` and `Watch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    /// The service asked about; empty for the server as a whole.
    #[prost(string, tag = "1")]
    pub service: String,
}

/// The answer of `Check`, and each message of `Watch`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    /// A [`ServingStatus`], as its number (see the generated `status()`).
    #[prost(enumeration = "ServingStatus", tag = "1")]
    pub status: i32,
}

impl HealthCheckResponse {
    /// A response carrying `status`.
    pub fn new(status: ServingStatus) -> Self {
        HealthCheckResponse {
            status: status.into(),
        }
    }
}

/// The request of `List`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthListRequest {}

/// The answer of `List`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthListResponse {
    /// Every service's status, the server's under the empty name.
    #[prost(map = "string, message", tag = "1")]
    pub statuses: HashMap<String, HealthCheckResponse>,
}

/// The statuses a [`Health`] and its reporters share.
#[derive(Debug)]
struct Registry {
    /// Whether the server serves: when not, every status reads `NotServing`.
    serving: Arc<Serving>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Each service's own status, the server's under "".
    statuses: HashMap<String, ServingStatus>,
    /// Counts changes of `statuses`, so a watcher knows whether it saw the latest.
    version: u64,
    /// The `Watch` calls waiting for a change, by watcher id: a call that ends takes its
    /// waker out, so that calls coming and going leave nothing behind.
    watchers: HashMap<u64, Waker>,
    next_watcher: u64,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change is one insert: a panic elsewhere cannot leave the state half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `service` reads now: its own status while the server serves, `NotServing`
    /// otherwise; `None` for a service without a status.
    fn status(&self, service: &str) -> Option<ServingStatus> {
        let own = self.lock().statuses.get(service).copied()?;
        Some(self.effective(own))
    }

    fn effective(&self, own: ServingStatus) -> ServingStatus {
        if self.serving.is_serving() {
            own
        } else {
            ServingStatus::NotServing
        }
    }

    fn set_status(&self, service: &str, status: ServingStatus) {
        let watchers = {
            let mut state = self.lock();
            if state.statuses.get(service) == Some(&status) {
                return;
            }
            state.statuses.insert(service.to_owned(), status);
            state.version += 1;
            std::mem::take(&mut state.watchers)
        };
        for waker in watchers.into_values() {
            waker.wake();
        }
    }

    fn list(&self) -> Result<HealthListResponse, Status> {
        let statuses: Vec<(String, ServingStatus)> = {
            let state = self.lock();
            if state.statuses.len() > LIST_LIMIT {
                return Err(Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "{} services have a status; List answers at most {LIST_LIMIT}",
                        state.statuses.len()
                    ),
                ));
            }
            state
                .statuses
                .iter()
                .map(|(name, status)| (name.clone(), *status))
                .collect()
        };
        let statuses = statuses
            .into_iter()
            .map(|(name, own)| (name, HealthCheckResponse::new(self.effective(own))))
            .collect();
        Ok(HealthListResponse { statuses })
    }
}

/// One `Watch` call's view of a service's status.
struct Watcher {
    registry: Arc<Registry>,
    service: String,
    id: u64,
    /// This call's id as a watcher of the server's serving state.
    serving_watcher: u64,
    /// The versions of the server's serving state and of the statuses last looked at.
    seen_serving: Option<u64>,
    seen_version: Option<u64>,
    /// The status last answered.
    last: Option<ServingStatus>,
}

impl Watcher {
    fn new(registry: Arc<Registry>, service: String) -> Self {
        let id = {
            let mut state = registry.lock();
            state.next_watcher += 1;
            state.next_watcher
        };
        let serving_watcher = registry.serving.watch();
        Watcher {
            registry,
            service,
            id,
            serving_watcher,
            seen_serving: None,
            seen_version: None,
            last: None,
        }
    }

    /// The service's status, the first time at once, then each time it differs from the
    /// one answered before; `None` once the server shuts down and `NotServing` was
    /// answered.
    async fn next(&mut self) -> Option<ServingStatus> {
        loop {
            // Once the server shuts down nothing changes any more: the last status, then
            // the end.
            let stopping = self.registry.serving.is_stopping();
            if !stopping {
                std::future::poll_fn(|cx| self.poll_change(cx)).await;
            }
            let status = self
                .registry
                .status(&self.service)
                .unwrap_or(ServingStatus::ServiceUnknown);
            if self.last != Some(status) {
                self.last = Some(status);
                return Some(status);
            }
            if stopping {
                return None;
            }
        }
    }

    /// Ready once the serving state or a status changed since last looked at (at once the
    /// first time); both are looked at every time, so that either change wakes the call.
    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let serving = self
            .registry
            .serving
            .poll_change(cx, self.serving_watcher, &mut self.seen_serving)
            .is_ready();
        let statuses = {
            let mut state = self.registry.lock();
            if self.seen_version != Some(state.version) {
                self.seen_version = Some(state.version);
                true
            } else {
                match state.watchers.get(&self.id) {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    _ => {
                        state.watchers.insert(self.id, cx.waker().clone());
                    }
                }
                false
            }
        };
        if serving || statuses {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.registry.lock().watchers.remove(&self.id);
        self.registry.serving.unwatch(self.serving_watcher);
    }
}

/// `Watch`: the status at once, then each change, until the call ends (sending then fails),
/// or the server shuts down: then the call ends (OK) after `NotServing`, so that watchers
/// do not hold a graceful shutdown up.
async fn watch(
    registry: Arc<Registry>,
    request: Request<HealthCheckRequest>,
    mut sink: ResponseSink<HealthCheckResponse>,
) -> Result<(), Status> {
    let mut watcher = Watcher::new(registry, request.message.service);
    while let Some(status) = watcher.next().await {
        sink.send(&HealthCheckResponse::new(status)).await?;
    }
    Ok(())
}

/// The `grpc.health.v1.Health` service: mount it with
/// [`Router::add_service`](crate::Router::add_service), change statuses through its
/// [`HealthReporter`].
#[derive(Clone, Debug)]
pub struct Health {
    registry: Arc<Registry>,
}

impl Health {
    /// A health service following `serving`, the server's serving state; `services` (the
    /// names of the services the server hosts) and the server as a whole start `Serving`.
    pub(crate) fn new(
        serving: Arc<Serving>,
        services: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        let mut statuses: HashMap<String, ServingStatus> = services
            .into_iter()
            .map(|name| (name.into(), ServingStatus::Serving))
            .collect();
        statuses.insert(String::new(), ServingStatus::Serving);
        let state = State {
            statuses,
            ..State::default()
        };
        Health {
            registry: Arc::new(Registry {
                serving,
                state: Mutex::new(state),
            }),
        }
    }

    /// A health service of its own, not tied to a server: `services` (full names such as
    /// "helloworld.Greeter") and the server as a whole start `Serving`, and it reads as
    /// serving until [`HealthReporter::set_serving`] says otherwise.
    pub fn standalone(services: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Health::new(Arc::new(Serving::default()), services)
    }

    /// A handle that changes the statuses this service answers.
    pub fn reporter(&self) -> HealthReporter {
        HealthReporter {
            registry: self.registry.clone(),
        }
    }
}

/// Changes the statuses a [`Health`] answers; `Watch` calls see each change. Cheap to
/// clone.
#[derive(Clone, Debug)]
pub struct HealthReporter {
    registry: Arc<Registry>,
}

impl HealthReporter {
    /// Sets `service`'s own status (the server's as a whole for ""), giving a status to a
    /// service that had none. While the server is not serving, it still reads
    /// `NotServing`, and this status again once it serves.
    pub fn set_status(&self, service: &str, status: ServingStatus) {
        self.registry.set_status(service, status);
    }

    /// Sets whether the server serves: while not, every status reads `NotServing`. For a
    /// health service a server built, this is the server's own serving state, as
    /// `ServerHandle::set_serving` sets it.
    pub fn set_serving(&self, serving: bool) {
        self.registry.serving.set(serving);
    }
}

/// The request and response messages of a method, in [`FILE_DESCRIPTOR_SET`].
fn schema(input: &'static str, output: &'static str) -> MethodSchema {
    MethodSchema::Protobuf {
        descriptors: FILE_DESCRIPTOR_SET,
        input,
        output,
    }
}

impl Service for Health {
    fn method_paths(&self) -> Vec<String> {
        [CHECK, WATCH, LIST].map(String::from).to_vec()
    }

    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        let registry = self.registry.clone();
        match request.method() {
            CHECK => unary_call(
                request,
                Protobuf,
                move |request: Request<HealthCheckRequest>| {
                    let service = request.message.service;
                    let answer = match registry.status(&service) {
                        Some(status) => Ok(Response::new(HealthCheckResponse::new(status))),
                        None => Err(Status::new(
                            Code::NotFound,
                            format!("no health status for service {service:?}"),
                        )),
                    };
                    futures::future::ready(answer)
                },
            ),
            WATCH => server_stream_call(request, Protobuf, move |request, sink| {
                watch(registry, request, sink)
            }),
            LIST => unary_call(request, Protobuf, move |_: Request<HealthListRequest>| {
                futures::future::ready(registry.list().map(Response::new))
            }),
            _ => unimplemented(&request),
        }
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        match method {
            CHECK | WATCH => Some(schema(
                "grpc.health.v1.HealthCheckRequest",
                "grpc.health.v1.HealthCheckResponse",
            )),
            LIST => Some(schema(
                "grpc.health.v1.HealthListRequest",
                "grpc.health.v1.HealthListResponse",
            )),
            _ => None,
        }
    }

    fn stream_kind(&self, method: &str) -> Option<StreamKind> {
        (method == WATCH).then_some(StreamKind::ServerStreaming)
    }
}

impl NamedService for Health {
    const METHODS: &'static [&'static str] = &[CHECK, WATCH, LIST];
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;
    use futures::FutureExt;

    fn poll_next(watcher: &mut Watcher) -> Poll<ServingStatus> {
        let mut cx = Context::from_waker(noop_waker_ref());
        Box::pin(watcher.next())
            .poll_unpin(&mut cx)
            .map(|status| status.expect("the server is not shutting down"))
    }

    /// A server's serving state (what `ServerHandle::set_serving` and a shutdown flip)
    /// reaches checks and watchers, over the services' own statuses.
    #[test]
    fn follows_the_servers_serving_state() {
        let serving = Arc::new(Serving::default());
        let health = Health::new(serving.clone(), ["a.A"]);
        let reporter = health.reporter();
        let registry = &health.registry;
        let mut watcher = Watcher::new(registry.clone(), "a.A".into());
        assert_eq!(poll_next(&mut watcher), Poll::Ready(ServingStatus::Serving));
        assert_eq!(poll_next(&mut watcher), Poll::Pending);

        serving.set(false);
        assert_eq!(registry.status(""), Some(ServingStatus::NotServing));
        assert_eq!(registry.status("a.A"), Some(ServingStatus::NotServing));
        assert_eq!(
            poll_next(&mut watcher),
            Poll::Ready(ServingStatus::NotServing)
        );
        // Changes of its own status read `NotServing` still: nothing to send.
        reporter.set_status("a.A", ServingStatus::NotServing);
        assert_eq!(poll_next(&mut watcher), Poll::Pending);
        reporter.set_status("a.A", ServingStatus::Serving);
        assert_eq!(poll_next(&mut watcher), Poll::Pending);

        serving.set(true);
        assert_eq!(poll_next(&mut watcher), Poll::Ready(ServingStatus::Serving));
        assert_eq!(registry.status(""), Some(ServingStatus::Serving));
        assert_eq!(registry.status("b.B"), None);
    }

    /// A watcher that ends takes its waker with it.
    #[test]
    fn ended_watchers_leave_nothing_behind() {
        let health = Health::standalone(["a.A"]);
        for _ in 0..3 {
            let mut watcher = Watcher::new(health.registry.clone(), "a.A".into());
            assert!(poll_next(&mut watcher).is_ready());
            assert!(poll_next(&mut watcher).is_pending());
        }
        assert!(health.registry.lock().watchers.is_empty());
    }
}
