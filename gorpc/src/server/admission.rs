//! Server-wide admission: at most `max_in_flight` calls run at once, across every
//! connection and protocol of a server; up to `max_queued` more wait their turn, in order,
//! each at most `max_queue_wait` and never past its own deadline. Beyond that a call is
//! refused `ResourceExhausted` at once, with a retry hint (`grpc-retry-pushback-ms`),
//! before any interceptor or handler runs: under overload the server keeps doing the work
//! it can finish in time instead of starting everything late.
//!
//! The slots are tokens in a bounded channel: taking one is a lock-free pop, giving it back
//! wakes the longest waiter. A newcomer takes a token directly only while nobody waits, so
//! waiting calls are not overtaken.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use gorpc_proto::StreamKind;

use crate::runtime::{timeout, Runtime};
use crate::service::{MethodSchema, Service};
use crate::{ServerReply, ServerRequest, Status};

/// Admission settings ([`ServerConfig::admission`](super::ServerConfig::admission)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Calls running at once, server-wide (a stream call counts while its handler runs).
    pub max_in_flight: usize,
    /// Calls waiting for a slot; one more is refused at once.
    pub max_queued: usize,
    /// The longest a call waits for a slot (its deadline, if sooner, ends the wait first).
    pub max_queue_wait: Duration,
    /// The retry hint sent with a refusal: how long a client should wait before trying
    /// again. Refusals cost the server little, but not nothing: under heavy overload a
    /// longer hint leaves more of the server to the calls it admits.
    pub retry_after: Duration,
}

impl AdmissionConfig {
    /// `max_in_flight` calls at once, as many waiting, each for at most 50 ms; refused
    /// clients are asked to wait 250 ms.
    pub fn new(max_in_flight: usize) -> Self {
        AdmissionConfig {
            max_in_flight,
            max_queued: max_in_flight,
            max_queue_wait: Duration::from_millis(50),
            retry_after: Duration::from_millis(250),
        }
    }
}

/// A service behind the admission gate.
pub(crate) struct Admitted<R: Runtime> {
    inner: Arc<dyn Service>,
    gate: Arc<Gate>,
    runtime: R,
}

struct Gate {
    /// One token per free slot.
    free: async_channel::Receiver<()>,
    give_back: async_channel::Sender<()>,
    /// Calls waiting for a token.
    queued: AtomicUsize,
    config: AdmissionConfig,
}

/// A slot held by a running call; dropping it (the call ended, or was cancelled and its
/// future dropped) frees the slot.
struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.0.give_back.try_send(());
    }
}

/// A place in the queue, given up on drop.
struct Waiting(Arc<Gate>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<R: Runtime> Admitted<R> {
    pub(crate) fn wrap(
        inner: Arc<dyn Service>,
        config: AdmissionConfig,
        runtime: R,
    ) -> Arc<dyn Service> {
        let slots = config.max_in_flight.max(1);
        let (give_back, free) = async_channel::bounded(slots);
        for _ in 0..slots {
            let _ = give_back.try_send(());
        }
        Arc::new(Admitted {
            inner,
            gate: Arc::new(Gate {
                free,
                give_back,
                queued: AtomicUsize::new(0),
                config,
            }),
            runtime,
        })
    }
}

/// The refusal of an overloaded server, with its retry hint.
fn overloaded(config: &AdmissionConfig) -> ServerReply {
    let status = Status::resource_exhausted(format!(
        "server overloaded: {} calls running and {} waiting",
        config.max_in_flight, config.max_queued
    ))
    .with_retry_after(config.retry_after);
    ServerReply::error(status)
}

impl<R: Runtime> Service for Admitted<R> {
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        let gate = &self.gate;
        if gate.queued.load(Ordering::Acquire) == 0 && gate.free.try_recv().is_ok() {
            let slot = Slot(gate.clone());
            let call = self.inner.call(request);
            return Box::pin(async move {
                let reply = call.await;
                drop(slot);
                reply
            });
        }
        if gate.queued.fetch_add(1, Ordering::AcqRel) >= gate.config.max_queued {
            gate.queued.fetch_sub(1, Ordering::AcqRel);
            return Box::pin(std::future::ready(overloaded(&gate.config)));
        }
        let waiting = Waiting(gate.clone());
        let gate = gate.clone();
        let inner = self.inner.clone();
        let runtime = self.runtime.clone();
        let wait_until = Instant::now() + gate.config.max_queue_wait;
        let wait_until = request.deadline.map_or(wait_until, |d| d.min(wait_until));
        Box::pin(async move {
            let token = timeout(&runtime, wait_until, gate.free.recv()).await;
            drop(waiting);
            match token {
                Some(Ok(())) => {
                    let slot = Slot(gate);
                    let reply = inner.call(request).await;
                    drop(slot);
                    reply
                }
                _ if request.deadline.is_some_and(|d| Instant::now() >= d) => {
                    ServerReply::error(Status::deadline_exceeded(
                        "deadline passed while waiting for the server to admit the call",
                    ))
                }
                _ => overloaded(&gate.config),
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
