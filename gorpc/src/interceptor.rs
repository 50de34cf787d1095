//! Interceptors: middleware around every call, on the server and on the client.
//!
//! An interceptor receives the call and a [`Next`] (server) or [`ClientNext`] (client) that
//! runs the rest of the chain. It can read and change metadata, answer by itself without
//! calling `next` (short-circuit, e.g. to refuse an unauthenticated call), and await `next`
//! to observe the outcome and its latency. Interceptors run in the order they were added.
//! With none installed, calls take exactly the path they take without this module: the
//! chain is only built when there is something in it.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use gorpc_proto::Status;

use crate::client::{OutgoingCall, RawResponse};
use crate::service::{MethodSchema, ServerReply, ServerRequest, Service};

/// Middleware around every call a server answers.
pub trait ServerInterceptor: Send + Sync + 'static {
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply>;
}

impl<F> ServerInterceptor for F
where
    F: Fn(ServerRequest, Next) -> BoxFuture<'static, ServerReply> + Send + Sync + 'static,
{
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        self(request, next)
    }
}

/// The rest of a server's chain: later interceptors, then the service.
#[derive(Clone)]
pub struct Next {
    interceptors: Arc<[Arc<dyn ServerInterceptor>]>,
    index: usize,
    service: Arc<dyn Service>,
}

impl std::fmt::Debug for Next {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Next")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Next {
    pub fn run(self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        match self.interceptors.get(self.index).cloned() {
            Some(interceptor) => {
                let next = Next {
                    index: self.index + 1,
                    ..self
                };
                interceptor.intercept(request, next)
            }
            None => self.service.call(request),
        }
    }
}

/// A service behind server interceptors.
pub(crate) struct ServerChain {
    interceptors: Arc<[Arc<dyn ServerInterceptor>]>,
    service: Arc<dyn Service>,
}

impl ServerChain {
    /// `service` itself when there is no interceptor, so that case costs nothing.
    pub(crate) fn wrap(
        interceptors: Vec<Arc<dyn ServerInterceptor>>,
        service: Arc<dyn Service>,
    ) -> Arc<dyn Service> {
        if interceptors.is_empty() {
            service
        } else {
            Arc::new(ServerChain {
                interceptors: interceptors.into(),
                service,
            })
        }
    }
}

impl Service for ServerChain {
    fn call(&self, request: ServerRequest) -> BoxFuture<'static, ServerReply> {
        let next = Next {
            interceptors: self.interceptors.clone(),
            index: 0,
            service: self.service.clone(),
        };
        next.run(request)
    }

    fn schema(&self, method: &str) -> Option<MethodSchema> {
        self.service.schema(method)
    }

    // Stream calls run through the chain too: interceptors see the opening request (and may
    // refuse it) and the final status; the messages flow past them.
    fn stream_kind(&self, method: &str) -> Option<gorpc_proto::StreamKind> {
        self.service.stream_kind(method)
    }

    fn method_paths(&self) -> Vec<String> {
        self.service.method_paths()
    }

    fn has_method(&self, method: &str) -> bool {
        self.service.has_method(method)
    }
}

/// Middleware around every call a client sends.
pub trait ClientInterceptor: Send + Sync + 'static {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>>;

    /// Runs, in chain order, before a stream call starts: may edit the opening call
    /// (metadata, deadline) or refuse it with an error the caller gets. The stream's
    /// messages and its end pass by; an interceptor that needs the end wraps the halves
    /// itself. Does nothing unless implemented.
    fn intercept_stream(&self, call: &mut OutgoingCall) -> Result<(), Status> {
        let _ = call;
        Ok(())
    }
}

impl<F> ClientInterceptor for F
where
    F: Fn(OutgoingCall, ClientNext) -> BoxFuture<'static, Result<RawResponse, Status>>
        + Send
        + Sync
        + 'static,
{
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        self(call, next)
    }
}

/// What finally sends a call once every client interceptor has run.
pub(crate) type Transmit =
    Arc<dyn Fn(OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> + Send + Sync>;

/// The rest of a client's chain: later interceptors, then the network.
#[derive(Clone)]
pub struct ClientNext {
    interceptors: Arc<[Arc<dyn ClientInterceptor>]>,
    index: usize,
    send: Transmit,
}

impl std::fmt::Debug for ClientNext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientNext")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ClientNext {
    pub(crate) fn start(interceptors: Arc<[Arc<dyn ClientInterceptor>]>, send: Transmit) -> Self {
        ClientNext {
            interceptors,
            index: 0,
            send,
        }
    }

    pub fn run(self, call: OutgoingCall) -> BoxFuture<'static, Result<RawResponse, Status>> {
        match self.interceptors.get(self.index).cloned() {
            Some(interceptor) => {
                let next = ClientNext {
                    index: self.index + 1,
                    ..self
                };
                interceptor.intercept(call, next)
            }
            None => (self.send)(call),
        }
    }
}

/// Logs every call through `tracing`: method, status, latency and, on servers, the peer.
/// Successful calls at DEBUG, failed ones at INFO.
#[derive(Clone, Copy, Debug, Default)]
pub struct Logging;

impl ServerInterceptor for Logging {
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        let method = request.method().to_owned();
        let peer = request.peer;
        let started = Instant::now();
        next.run(request)
            .map(move |reply| {
                let (status, elapsed) = (&reply.status, started.elapsed());
                if status.is_ok() {
                    tracing::debug!(%method, ?peer, ?elapsed, "served");
                } else {
                    tracing::info!(%method, ?peer, ?elapsed, %status, "served with error");
                }
                reply
            })
            .boxed()
    }
}

impl ClientInterceptor for Logging {
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let method = call.method.clone();
        let started = Instant::now();
        next.run(call)
            .map(move |result| {
                let elapsed = started.elapsed();
                match &result {
                    Ok(_) => tracing::debug!(%method, ?elapsed, "called"),
                    Err(status) => tracing::info!(%method, ?elapsed, %status, "call failed"),
                }
                result
            })
            .boxed()
    }

    fn intercept_stream(&self, call: &mut OutgoingCall) -> Result<(), Status> {
        tracing::debug!(method = %call.method, "stream call starting");
        Ok(())
    }
}
