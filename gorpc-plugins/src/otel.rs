//! Distributed tracing with OpenTelemetry: [`OtelClient`] starts a span for every call a
//! client sends and passes its context along in the call's metadata; [`OtelServer`] picks
//! that context up and starts the server's span as its child.
//!
//! The context travels as W3C Trace Context (`traceparent`, and `tracestate` when there is
//! one), through [`TraceContextPropagator`]. Both interceptors take the [`Tracer`] they use
//! from their constructor, so an application (or a test) chooses its provider, exporter and
//! sampler; [`OtelClient::global`] and [`OtelServer::global`] take one from
//! [`opentelemetry::global`] instead.
//!
//! Each span is named by the method path (`/pkg.Svc/Method`) and carries:
//!
//! - `rpc.system = "gorpc"`, `rpc.service = "pkg.Svc"`, `rpc.method = "Method"`;
//! - `rpc.grpc.status_code`: the numeric [`Code`] of the outcome (gorpc uses gRPC's
//!   numbering); a failed call also gets span status `Error` with the status message;
//! - on the server, `network.peer.address` and `network.peer.port` of the caller.
//!
//! On the client, the span is a child of [`Context::current()`] at the time the call is made,
//! so a call made inside an application span belongs to it. On the server, the handler (and
//! any interceptor added after [`OtelServer`]) runs with the server span's context attached:
//! [`Context::current()`] inside it is that span, so the handler's own spans and outgoing
//! calls continue the trace. A request without a trace context, or with a malformed one,
//! starts a new trace; it is never refused.
//!
//! A call the caller stops waiting for (its future dropped) ends its client span with status
//! `Error` and code `Cancelled`.

use std::borrow::Cow;
use std::fmt;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use gorpc::client::OutgoingCall;
use gorpc::{
    ClientInterceptor, ClientNext, Code, Metadata, Next, RawResponse, ServerInterceptor,
    ServerReply, ServerRequest, Status,
};
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{FutureExt as _, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// The metadata key of the W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// The instrumentation scope name [`OtelClient::global`] and [`OtelServer::global`] use.
pub const SCOPE: &str = "gorpc";

/// A client interceptor that traces every call in a span of kind `Client` and sends the
/// span's context to the server in the call's metadata.
pub struct OtelClient<T = BoxedTracer> {
    tracer: T,
    propagator: TraceContextPropagator,
}

impl<T> OtelClient<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    /// Traces with `tracer`, e.g. `provider.tracer("my-service")`.
    pub fn new(tracer: T) -> Self {
        OtelClient {
            tracer,
            propagator: TraceContextPropagator::new(),
        }
    }
}

impl OtelClient<BoxedTracer> {
    /// Traces with the global tracer provider's tracer for [`SCOPE`].
    pub fn global() -> Self {
        OtelClient::new(global::tracer(SCOPE))
    }
}

impl<T> fmt::Debug for OtelClient<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelClient").finish_non_exhaustive()
    }
}

impl<T> ClientInterceptor for OtelClient<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    fn intercept(
        &self,
        mut call: OutgoingCall,
        next: ClientNext,
    ) -> BoxFuture<'static, Result<RawResponse, Status>> {
        let parent = Context::current();
        let builder = self
            .tracer
            .span_builder(call.method.clone())
            .with_kind(SpanKind::Client)
            .with_attributes(rpc_attributes(&call.method));
        let span = self.tracer.build_with_context(builder, &parent);
        let cx = parent.with_span(span);
        self.propagator
            .inject_context(&cx, &mut MetadataInjector(&mut call.metadata));
        let mut ending = Ending::new(cx.clone());
        // Later interceptors start their work when called: let them see the span too.
        let sending = {
            let _attached = cx.clone().attach();
            next.run(call)
        };
        sending
            .with_context(cx)
            .map(move |result| {
                match &result {
                    Ok(_) => ending.finish(Code::Ok, ""),
                    Err(status) => ending.finish(status.code(), status.message()),
                }
                result
            })
            .boxed()
    }

    /// A stream call carries the caller's current trace context, so the server's span is
    /// its child; no client span is made, since the stream's end passes by interceptors.
    fn intercept_stream(&self, call: &mut OutgoingCall) -> Result<(), Status> {
        self.propagator.inject_context(
            &Context::current(),
            &mut MetadataInjector(&mut call.metadata),
        );
        Ok(())
    }
}

/// A server interceptor that traces every call in a span of kind `Server`, the child of the
/// context the client sent, and runs the rest of the chain inside it.
pub struct OtelServer<T = BoxedTracer> {
    tracer: T,
    propagator: TraceContextPropagator,
}

impl<T> OtelServer<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    /// Traces with `tracer`, e.g. `provider.tracer("my-service")`.
    pub fn new(tracer: T) -> Self {
        OtelServer {
            tracer,
            propagator: TraceContextPropagator::new(),
        }
    }
}

impl OtelServer<BoxedTracer> {
    /// Traces with the global tracer provider's tracer for [`SCOPE`].
    pub fn global() -> Self {
        OtelServer::new(global::tracer(SCOPE))
    }
}

impl<T> fmt::Debug for OtelServer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelServer").finish_non_exhaustive()
    }
}

impl<T> ServerInterceptor for OtelServer<T>
where
    T: Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    fn intercept(&self, request: ServerRequest, next: Next) -> BoxFuture<'static, ServerReply> {
        // The remote context only: whatever happens to be current on the thread polling the
        // connection is no parent of this call.
        let parent = self
            .propagator
            .extract_with_context(&Context::new(), &RequestExtractor(&request));
        let mut attributes = rpc_attributes(request.method());
        if let Some(peer) = request.peer {
            attributes.push(KeyValue::new("network.peer.address", peer.ip().to_string()));
            attributes.push(KeyValue::new("network.peer.port", i64::from(peer.port())));
        }
        let builder = self
            .tracer
            .span_builder(request.method().to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes);
        let span = self.tracer.build_with_context(builder, &parent);
        let cx = parent.with_span(span);
        let mut ending = Ending::new(cx.clone());
        // A handler may do work before its first await, when `next.run` calls it.
        let answering = {
            let _attached = cx.clone().attach();
            next.run(request)
        };
        answering
            .with_context(cx)
            .map(move |reply| {
                ending.finish(reply.status.code(), reply.status.message());
                reply
            })
            .boxed()
    }
}

/// Ends a call's span once: with the outcome, or as cancelled if the call's future is
/// dropped first.
struct Ending {
    cx: Context,
    done: bool,
}

impl Ending {
    fn new(cx: Context) -> Self {
        Ending { cx, done: false }
    }

    fn finish(&mut self, code: Code, message: &str) {
        self.done = true;
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
        if code != Code::Ok {
            let description = if message.is_empty() {
                code.as_str().to_owned()
            } else {
                message.to_owned()
            };
            span.set_status(opentelemetry::trace::Status::error(description));
        }
        span.end();
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        if !self.done {
            self.finish(Code::Cancelled, "call dropped before it finished");
        }
    }
}

/// `rpc.system`, and `rpc.service` and `rpc.method` when `path` is `/service/method`.
fn rpc_attributes(path: &str) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(5);
    attributes.push(KeyValue::new("rpc.system", "gorpc"));
    if let Some((service, method)) = split_path(path) {
        attributes.push(KeyValue::new("rpc.service", service.to_owned()));
        attributes.push(KeyValue::new("rpc.method", method.to_owned()));
    }
    attributes
}

/// `("pkg.Svc", "Method")` from `/pkg.Svc/Method`; `None` for anything else.
pub fn split_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = !service.is_empty() && !method.is_empty() && !method.contains('/');
    valid.then_some((service, method))
}

/// Writes propagation fields into a call's metadata, replacing earlier values.
pub struct MetadataInjector<'a>(pub &'a mut Metadata);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Metadata keys are lowercase, like HTTP/2 header names.
        let key: Cow<'static, str> = match key {
            TRACEPARENT => Cow::Borrowed(TRACEPARENT),
            TRACESTATE => Cow::Borrowed(TRACESTATE),
            other => Cow::Owned(other.to_ascii_lowercase()),
        };
        self.0.insert(key, value);
    }
}

/// Reads propagation fields from a received request without copying its metadata.
pub struct RequestExtractor<'a>(pub &'a ServerRequest);

impl Extractor for RequestExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = if key.bytes().any(|b| b.is_ascii_uppercase()) {
            self.0.metadata_value(&key.to_ascii_lowercase())
        } else {
            self.0.metadata_value(key)
        }?;
        std::str::from_utf8(value).ok()
    }

    /// Only the W3C trace-context keys present: listing every key would copy the metadata
    /// out of the frame, and [`TraceContextPropagator`] never asks.
    fn keys(&self) -> Vec<&str> {
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|key| self.0.metadata_value(key).is_some())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::split_path;

    #[test]
    fn splits_method_paths() {
        assert_eq!(split_path("/pkg.Svc/Method"), Some(("pkg.Svc", "Method")));
        assert_eq!(split_path("/Svc/m"), Some(("Svc", "m")));
        for bad in ["", "/", "//", "/Svc", "/Svc/", "//m", "Svc/m", "/a/b/c"] {
            assert_eq!(split_path(bad), None, "{bad:?}");
        }
    }
}
