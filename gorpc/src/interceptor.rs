//! Interceptors: middleware around every call, on the server and on the client.
//!
//! An interceptor receives the call and a [`Next`] (server) or [`ClientNext`] (client) that
//! runs the rest of the chain. It can read and change metadata, answer by itself without
//! calling `next` (short-circuit, e.g. to refuse an unauthenticated call), and await `next`
//! to observe the outcome and its latency. Interceptors run in the order they were added.
//! With none installed, calls take exactly the path they take without this module: the
//! chain is only built when there is something in it.
//!
//! Awaiting `next` shows how calls that are answered end, but not the calls that end
//! without an answer: at their deadline, cancelled by the peer, or with their connection.
//! Every call's end, those included, reaches [`ServerInterceptor::on_end`] and
//! [`ClientInterceptor::on_end`].

use std::sync::Arc;

use futures::future::BoxFuture;
use gorpc_proto::Status;

use crate::client::{OutgoingCall, RawResponse};
use crate::observe::{EndListener, EndedCall};
use crate::service::{MethodSchema, ServerReply, ServerRequest, Service};

/// Middleware around every call a server answers.
pub trait ServerInterceptor: Send + Sync + 'static {
    /// Runs around the call: returns `next.run(request)` (the default), changes the
    /// request or the reply, or answers by itself.
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        next.run(request)
    }

    /// Hears how every call the server took ended, with its duration: answered (with its
    /// status), refused, past its deadline, cancelled by the client, or cut off with its
    /// connection. Runs on the connection's task, inside the call's span: keep it short.
    /// Does nothing unless implemented.
    fn on_end(&self, call: &EndedCall<'_>) {
        let _ = call;
    }
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
    /// Runs the rest of the chain on `request`: the next interceptor, or the service.
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
    /// Runs around the call: returns `next.run(call)` (the default), changes the call or
    /// its outcome, or answers by itself.
    fn intercept(
        &self,
        call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        next.run(call)
    }

    /// Hears how every call ended, unary or stream, with its duration, including those the
    /// caller stopped waiting for (`Cancelled`); a stream ends when its receiver hands out
    /// the end or is dropped. Runs inside the call's span. Does nothing unless
    /// implemented.
    fn on_end(&self, call: &EndedCall<'_>) {
        let _ = call;
    }

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

    /// Runs the rest of the chain on `call`: the next interceptor, or the send itself.
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

/// Logs one INFO line for every call that succeeds, on a server or a client.
///
/// Failed calls are logged without it: at WARN, or ERROR for the codes that mean a bug or
/// a broken server (`Internal`, `Unknown`, `DataLoss`), each inside the call's span, whose
/// fields name the method, the peer, the call's id, its code and its duration. Successes
/// are logged at DEBUG; this interceptor raises them to INFO.
#[derive(Clone, Copy, Debug, Default)]
pub struct Logging;

impl ServerInterceptor for Logging {
    fn on_end(&self, call: &EndedCall<'_>) {
        if call.end.is_ok() {
            tracing::info!(target: "gorpc::call", "answered");
        }
    }
}

impl ClientInterceptor for Logging {
    fn on_end(&self, call: &EndedCall<'_>) {
        if call.end.is_ok() {
            tracing::info!(target: "gorpc::call", "answered");
        }
    }
}

/// The interceptors' `on_end`, for the observer of a server's calls.
pub(crate) fn server_listeners(interceptors: &[Arc<dyn ServerInterceptor>]) -> Vec<EndListener> {
    let listener = |interceptor: &Arc<dyn ServerInterceptor>| -> EndListener {
        let interceptor = interceptor.clone();
        Arc::new(move |call: &EndedCall<'_>| interceptor.on_end(call))
    };
    interceptors.iter().map(listener).collect()
}

/// The interceptors' `on_end`, for the observer of a client's calls.
pub(crate) fn client_listeners(interceptors: &[Arc<dyn ClientInterceptor>]) -> Vec<EndListener> {
    let listener = |interceptor: &Arc<dyn ClientInterceptor>| -> EndListener {
        let interceptor = interceptor.clone();
        Arc::new(move |call: &EndedCall<'_>| interceptor.on_end(call))
    };
    interceptors.iter().map(listener).collect()
}
