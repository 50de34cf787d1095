//! OtelClient and OtelServer over real sockets, exporting into memory.

#![cfg(feature = "otel")]

use bytes::Bytes;
use gorpc::{
    CallOptions, Client, Code, Metadata, Router, Runtime, Server, ServerHandle, ServerReply,
    ServerRequest, Status,
};
use gorpc_plugins::otel::{OtelClient, OtelServer, TRACEPARENT, TRACESTATE};
use gorpc_tests::{client_config, loopback, on_every_runtime};
use opentelemetry::trace::{
    FutureExt as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracer, SdkTracerProvider, SpanData};

const ECHO: &str = "/test.Trace/Echo";
const FAIL: &str = "/test.Trace/Fail";
/// Answers "<trace id>|<span id>" of the current context before its first await, then the
/// same after it, then the `tracestate` metadata it received ("-" when none).
const WHERE: &str = "/test.Trace/Where";

/// A provider exporting synchronously into an exporter the test reads.
fn provider() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    (provider, exporter)
}

fn tracer(provider: &SdkTracerProvider) -> SdkTracer {
    provider.tracer("gorpc-plugins-test")
}

fn current_ids() -> String {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    format!("{}|{}", sc.trace_id(), sc.span_id())
}

async fn serve<S: Runtime>(runtime: S, provider: &SdkTracerProvider) -> ServerHandle<S> {
    let router = Router::new()
        .route(ECHO, |req: ServerRequest| async move {
            ServerReply::ok(req.body)
        })
        .route(FAIL, |_req: ServerRequest| async move {
            ServerReply::error(Status::new(Code::NotFound, "no such thing"))
        })
        .route(WHERE, |req: ServerRequest| {
            let before = current_ids();
            let state = String::from_utf8_lossy(req.metadata_value(TRACESTATE).unwrap_or(b"-"))
                .into_owned();
            async move {
                futures::future::ready(()).await;
                let after = current_ids();
                ServerReply::ok(Bytes::from(format!("{before}|{after}|{state}")))
            }
        });
    Server::new(runtime, router)
        .interceptor(OtelServer::new(tracer(provider)))
        .bind(loopback())
        .await
        .unwrap()
}

async fn traced_client<C: Runtime>(
    runtime: C,
    server: std::net::SocketAddr,
    provider: &SdkTracerProvider,
) -> Client {
    Client::connect(runtime, server, client_config())
        .await
        .unwrap()
        .with_interceptor(OtelClient::new(tracer(provider)))
}

async fn call(client: &Client, method: &'static str, metadata: Metadata) -> Result<Bytes, Status> {
    let options = CallOptions {
        metadata,
        ..CallOptions::default()
    };
    let rsp = client
        .call_raw(method, 0, Bytes::from_static(b"hi"), options)
        .await?;
    Ok(rsp.body)
}

fn spans(exporter: &InMemorySpanExporter) -> Vec<SpanData> {
    exporter.get_finished_spans().unwrap()
}

/// The one span of `kind`.
fn only(spans: &[SpanData], kind: SpanKind) -> &SpanData {
    let mut of_kind = spans.iter().filter(|s| s.span_kind == kind);
    let span = of_kind.next().unwrap_or_else(|| panic!("no {kind:?} span"));
    assert!(of_kind.next().is_none(), "more than one {kind:?} span");
    span
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn assert_rpc_attributes(span: &SpanData, method: &str, code: i64) {
    assert_eq!(attribute(span, "rpc.system"), Some(&Value::from("gorpc")));
    assert_eq!(
        attribute(span, "rpc.service"),
        Some(&Value::from("test.Trace"))
    );
    assert_eq!(
        attribute(span, "rpc.method"),
        Some(&Value::from(method.to_owned()))
    );
    assert_eq!(
        attribute(span, "rpc.grpc.status_code"),
        Some(&Value::I64(code))
    );
}

async fn one_call_makes_a_client_span_and_its_server_child<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (provider, exporter) = provider();
    let server = serve(server_rt, &provider).await;
    let client = traced_client(client_rt, server.local_addr(), &provider).await;

    assert_eq!(
        &call(&client, ECHO, Metadata::new()).await.unwrap()[..],
        b"hi"
    );

    let spans = spans(&exporter);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let (client_span, server_span) = (
        only(&spans, SpanKind::Client),
        only(&spans, SpanKind::Server),
    );
    assert_eq!(client_span.name, ECHO);
    assert_eq!(server_span.name, ECHO);
    assert_eq!(client_span.parent_span_id, SpanId::INVALID, "a root span");
    assert_eq!(
        server_span.span_context.trace_id(),
        client_span.span_context.trace_id()
    );
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    assert!(server_span.parent_span_is_remote);
    assert_ne!(
        server_span.span_context.span_id(),
        client_span.span_context.span_id()
    );
    for span in [client_span, server_span] {
        assert_rpc_attributes(span, "Echo", 0);
        assert_eq!(span.status, opentelemetry::trace::Status::Unset);
    }
    assert_eq!(
        attribute(server_span, "network.peer.address"),
        Some(&Value::from("127.0.0.1"))
    );
    assert!(attribute(server_span, "network.peer.port").is_some());
    assert!(attribute(client_span, "network.peer.address").is_none());
    server.abort().await;
}

async fn an_error_is_recorded_on_both_spans<S: Runtime, C: Runtime>(server_rt: S, client_rt: C) {
    let (provider, exporter) = provider();
    let server = serve(server_rt, &provider).await;
    let client = traced_client(client_rt, server.local_addr(), &provider).await;

    let err = call(&client, FAIL, Metadata::new()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let spans = spans(&exporter);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    for kind in [SpanKind::Client, SpanKind::Server] {
        let span = only(&spans, kind.clone());
        assert_eq!(span.name, FAIL);
        assert_rpc_attributes(span, "Fail", Code::NotFound as i64);
        assert_eq!(
            span.status,
            opentelemetry::trace::Status::error("no such thing"),
            "{kind:?}"
        );
    }
    server.abort().await;
}

async fn a_call_inside_an_application_span_is_its_child<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (provider, exporter) = provider();
    let server = serve(server_rt, &provider).await;
    let client = traced_client(client_rt, server.local_addr(), &provider).await;

    let outer = tracer(&provider).start("outer");
    let outer_cx = Context::current_with_span(outer);
    let outer_id = outer_cx.span().span_context().clone();
    call(&client, ECHO, Metadata::new())
        .with_context(outer_cx.clone())
        .await
        .unwrap();
    outer_cx.span().end();

    let spans = spans(&exporter);
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let client_span = only(&spans, SpanKind::Client);
    let server_span = only(&spans, SpanKind::Server);
    assert_eq!(client_span.parent_span_id, outer_id.span_id());
    assert!(!client_span.parent_span_is_remote);
    assert_eq!(client_span.span_context.trace_id(), outer_id.trace_id());
    assert_eq!(server_span.span_context.trace_id(), outer_id.trace_id());
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id()
    );
    server.abort().await;
}

async fn the_handler_runs_inside_the_server_span<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (provider, exporter) = provider();
    let server = serve(server_rt, &provider).await;
    let client = traced_client(client_rt, server.local_addr(), &provider).await;

    // A remote parent with a trace state: the state travels on to the server.
    let parent = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        TraceState::from_key_value([("vendor", "opaque")]).unwrap(),
    );
    let parent_cx = Context::new().with_remote_span_context(parent.clone());
    let body = call(&client, WHERE, Metadata::new())
        .with_context(parent_cx)
        .await
        .unwrap();
    let body = String::from_utf8(body.to_vec()).unwrap();

    let spans = spans(&exporter);
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client_span = only(&spans, SpanKind::Client);
    let server_span = only(&spans, SpanKind::Server);
    assert_eq!(client_span.parent_span_id, parent.span_id());
    let sc = &server_span.span_context;
    assert_eq!(sc.trace_id(), parent.trace_id());
    let ids = format!("{}|{}", sc.trace_id(), sc.span_id());
    assert_eq!(
        body,
        format!("{ids}|{ids}|vendor=opaque"),
        "before and after the handler's first await"
    );
    assert_eq!(sc.trace_state().get("vendor"), Some("opaque"));
    server.abort().await;
}

async fn a_malformed_traceparent_starts_a_new_trace<S: Runtime, C: Runtime>(
    server_rt: S,
    client_rt: C,
) {
    let (provider, exporter) = provider();
    let server = serve(server_rt, &provider).await;
    // No OtelClient: the metadata reaches the server as written here.
    let client = Client::connect(client_rt, server.local_addr(), client_config())
        .await
        .unwrap();

    let malformed = [
        &b"00-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-00f067aa0ba902b7-01"[..],
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        b"not a traceparent",
        b"\xff\xfe",
        b"",
    ];
    for value in malformed {
        let mut metadata = Metadata::new();
        metadata.insert(TRACEPARENT, Bytes::from_static(value));
        metadata.insert(TRACESTATE, Bytes::from_static(b"vendor=opaque"));
        call(&client, ECHO, metadata).await.unwrap();
    }
    call(&client, ECHO, Metadata::new()).await.unwrap();

    let spans = spans(&exporter);
    assert_eq!(spans.len(), malformed.len() + 1, "{spans:#?}");
    for span in &spans {
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.parent_span_id, SpanId::INVALID, "a root span");
        assert!(span.span_context.is_valid());
        assert_rpc_attributes(span, "Echo", 0);
    }
    let mut traces: Vec<_> = spans.iter().map(|s| s.span_context.trace_id()).collect();
    traces.sort_unstable_by_key(|t| t.to_bytes());
    traces.dedup();
    assert_eq!(traces.len(), spans.len(), "one new trace per call");
    server.abort().await;
}

on_every_runtime!(
    one_call_makes_a_client_span_and_its_server_child,
    an_error_is_recorded_on_both_spans,
    a_call_inside_an_application_span_is_its_child,
    the_handler_runs_inside_the_server_span,
    a_malformed_traceparent_starts_a_new_trace,
);
